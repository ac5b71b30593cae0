//! The Redis job store.
//!
//! Layout, every key under one prefix (default `orch:`):
//! - `job:{id}`: a hash. `base` holds the immutable part of the job as
//!   protobuf bytes; the fields that change (`state`, `attempt`, `lease`, ...)
//!   are separate hash fields so that Lua scripts can compare and set them.
//! - `hist:{id}`: a list of protobuf-encoded `Transition`s.
//! - `idx:{ns}:all`, `idx:{ns}:state:{STATE}`, `idx:{ns}:kind:{kind}`,
//!   `idx:{ns}:queue:{queue}`, per namespace `ns`: sorted sets with score 0
//!   whose members `{created_ms:013}:{id}` sort by creation time, so pages
//!   are lexicographic range reads (newest first) with the last member as
//!   the cursor: no scan of all jobs, ever, and no reading of another
//!   tenant's jobs.
//! - `idem:{ns}:{key}`: idempotency key to job id, per namespace, so one
//!   tenant's keys can neither collide with nor reveal another's.
//! - `namespaces`: a set of every namespace that ever had a job.
//! - `due`: the outbox; job ids scored by when they must be published.
//! - `leases`: running job ids scored by lease expiry, for the sweeper.
//! - `retention`: terminal job ids scored by when they are purged.
//!
//! Every write is one Lua script, so it is atomic and one round trip.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use futures::stream::BoxStream;
use prost::Message;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};
use uuid::Uuid;

use super::changes::Notice;
use super::subscriber::Subscriber;
use super::{Applied, Change, Created, Due, DueJob, ExpiredLease, JobStore, LeaseChange, Page};
use crate::error::{Error, Result};
use crate::job::{NewJob, ms_to_timestamp};
use crate::proto::v1::{Job, Transition};
use crate::state::State;
use crate::validate::ListQuery;

/// How long terminal jobs are kept unless configured otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Settings of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// `redis://host:port/db` (or `rediss://`).
    pub url: String,
    /// Prefix of every key.
    pub prefix: String,
    /// How long terminal jobs are kept.
    pub retention: Duration,
    /// A private CA to trust for a `rediss://` URL (else the system's roots).
    pub ca_cert: Option<std::path::PathBuf>,
}

impl RedisStoreConfig {
    /// Defaults for `url`: prefix `orch:`, 7 days of retention.
    pub fn new(url: impl Into<String>) -> Self {
        RedisStoreConfig {
            url: url.into(),
            prefix: "orch:".into(),
            retention: DEFAULT_RETENTION,
            ca_cert: None,
        }
    }
}

/// The Redis-backed [`JobStore`]. Cheap to clone; all clones share one
/// multiplexed, self-reconnecting connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    retention_ms: i64,
    scripts: std::sync::Arc<Scripts>,
    /// Watchers in this process and the connection that tells them of
    /// changes made elsewhere.
    subscriber: std::sync::Arc<Subscriber>,
}

struct Scripts {
    create: Script,
    apply: Script,
    claim_due: Script,
    ack_due: Script,
    purge: Script,
}

const CREATE_LUA: &str = r#"
-- KEYS: job, hist, idem, due, and the namespace's idx:all, idx:state:CREATED,
--       idx:kind, idx:queue; then namespaces
-- ARGV: id, use_idem, index member, history entry, due score, namespace,
--       field/value...
if ARGV[2] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[3], ARGV[1])
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1} end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('RPUSH', KEYS[2], ARGV[4])
for i = 5, 8 do redis.call('ZADD', KEYS[i], 0, ARGV[3]) end
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('SADD', KEYS[9], ARGV[6])
return {1}
"#;

const APPLY_LUA: &str = r#"
-- KEYS: job, hist, due, leases, retention
-- ARGV[1] expected state ('' any)     ARGV[2] expected lease ('' any)
-- ARGV[3] lease must have expired by ('' no check)
-- ARGV[4] new state ('' same)          ARGV[5] index prefix ('{prefix}idx:')
-- ARGV[6] history entry ('' none)      ARGV[7] due: '' keep, '-' remove, else score
-- ARGV[8] lease: '' keep, '-' clear, else expiry score
-- ARGV[9] retention score ('' none)
-- ARGV[10] '<event channel> <writer id>' ('' none): PUBLISH the writer id on the channel
-- ARGV[11] expected attempt ('' any)  ARGV[12] expected namespace ('' any)
-- ARGV[13] n
-- ARGV[14] reply: '' the outcome only; '1' also the job and history as
--          written; 'p' also the job's fields as they were before the write
--          (PRE_IMAGE_FIELDS, in that order), for the caller to apply its
--          own change to: the job without its history, at no extra read
-- ARGV[15] expected cancel request: '' any, '1' requested, '0' not
-- then n field/value pairs to set (the new state among them); then fields
-- to delete
-- Every redis.call costs a Lua-to-Redis round of its own, so the guards
-- read once and the writes to the hash go in one HSET and one HDEL.
-- The guards come first, in the same places in both reads.
local f
if ARGV[14] == 'p' then
  f = redis.call('HMGET', KEYS[1], 'state', 'ns', 'attempt', 'lease', 'lease_exp', 'id', 'ix',
    'cancel', 'base', 'error', 'worker', 'result', 'updated', 'started', 'finished', 'next_at')
else
  f = redis.call('HMGET', KEYS[1], 'state', 'ns', 'attempt', 'lease', 'lease_exp', 'id', 'ix',
    'cancel')
end
local state = f[1]
if not state then return {-1} end
local ns = f[2] or 'default'
if ARGV[12] ~= '' and ns ~= ARGV[12] then return {-1} end
if ARGV[1] ~= '' and state ~= ARGV[1] then return {0, state, 0} end
if ARGV[11] ~= '' and (f[3] or '0') ~= ARGV[11] then return {0, state, 0} end
if ARGV[2] ~= '' and f[4] ~= ARGV[2] then return {0, state, 1} end
if ARGV[3] ~= '' and tonumber(f[5] or '0') > tonumber(ARGV[3]) then return {0, state, 1} end
if ARGV[15] ~= '' and (f[8] or '0') ~= ARGV[15] then return {0, state, 0} end
local id = f[6]
if ARGV[4] ~= '' and ARGV[4] ~= state then
  local sx = ARGV[5] .. ns .. ':state:'
  redis.call('ZREM', sx .. state, f[7])
  redis.call('ZADD', sx .. ARGV[4], 0, f[7])
end
if ARGV[6] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[6]) end
if ARGV[7] == '-' then redis.call('ZREM', KEYS[3], id)
elseif ARGV[7] ~= '' then redis.call('ZADD', KEYS[3], ARGV[7], id) end
if ARGV[8] == '-' then redis.call('ZREM', KEYS[4], id)
elseif ARGV[8] ~= '' then redis.call('ZADD', KEYS[4], ARGV[8], id) end
if ARGV[9] ~= '' then redis.call('ZADD', KEYS[5], ARGV[9], id) end
local last = 15 + 2 * tonumber(ARGV[13])
if last > 15 then redis.call('HSET', KEYS[1], unpack(ARGV, 16, last)) end
if #ARGV > last then redis.call('HDEL', KEYS[1], unpack(ARGV, last + 1)) end
if ARGV[10] ~= '' then
  local channel, writer = string.match(ARGV[10], '^(.*) ([^ ]*)$')
  redis.call('PUBLISH', channel, writer)
end
if ARGV[14] == '' then return {1} end
if ARGV[14] == 'p' then return {1, f} end
return {1, redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"#;

/// The hash fields the apply script's `'p'` reply holds, in its order: the
/// guards it reads anyway, then every field [`decode_job`] reads.
const PRE_IMAGE_FIELDS: [&str; 16] = [
    "state",
    "ns",
    "attempt",
    "lease",
    "lease_exp",
    "id",
    "ix",
    "cancel",
    "base",
    "error",
    "worker",
    "result",
    "updated",
    "started",
    "finished",
    "next_at",
];

/// What the apply script answers besides the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadBack {
    /// Nothing.
    None,
    /// The job and its history as written (a read after the write).
    Full,
    /// The job's fields before the write; with the change applied to them,
    /// the job as written without its history.
    PreImage,
}

impl ReadBack {
    fn arg(self) -> &'static str {
        match self {
            ReadBack::None => "",
            ReadBack::Full => "1",
            ReadBack::PreImage => "p",
        }
    }
}

const CLAIM_DUE_LUA: &str = r#"
-- KEYS: due. ARGV: now, claim until, limit, job key prefix
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', ARGV[4] .. id, 'state', 'kind', 'queue', 'attempt', 'ns', 'max')
  if f[1] == 'CREATED' or f[1] == 'RETRYING' then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = {id, f[2], f[3], f[4] or '0', f[5] or 'default', f[6] or '0'}
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"#;

const ACK_DUE_LUA: &str = r#"
-- KEYS: due. ARGV: id, claim, id, claim, ...
-- Returns how many entries went.
local acked = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    acked = acked + 1
  end
end
return acked
"#;

const PURGE_LUA: &str = r#"
-- KEYS: retention. ARGV: now, limit, prefix
local p = ARGV[3]
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', p .. 'job:' .. id, 'state', 'kind', 'queue', 'ix', 'idem', 'ns')
  local x = p .. 'idx:' .. (f[6] or 'default') .. ':'
  if f[4] then
    redis.call('ZREM', x .. 'all', f[4])
    redis.call('ZREM', x .. 'state:' .. f[1], f[4])
    redis.call('ZREM', x .. 'kind:' .. f[2], f[4])
    redis.call('ZREM', x .. 'queue:' .. f[3], f[4])
  end
  local idem = p .. 'idem:' .. (f[6] or 'default') .. ':' .. (f[5] or '')
  if f[5] and f[5] ~= '' and redis.call('GET', idem) == id then
    redis.call('DEL', idem)
  end
  redis.call('DEL', p .. 'job:' .. id, p .. 'hist:' .. id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', p .. 'due', id)
  redis.call('ZREM', p .. 'leases', id)
end
return #ids
"#;

/// Most index entries one list request looks at when filters are combined;
/// past that it returns a short page with a cursor.
const MAX_LIST_SCAN: usize = 5000;

impl RedisStore {
    /// A store for `config`. Connects lazily, so this succeeds while Redis
    /// is down; operations fail with UNAVAILABLE until it is back.
    pub fn new(config: &RedisStoreConfig) -> Result<Self> {
        let client = crate::tls::redis_client(&config.url, config.ca_cert.as_deref())?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(Error::from)?;
        let subscriber = Subscriber::new(client, format!("{}ev:", config.prefix));
        Ok(RedisStore {
            subscriber: std::sync::Arc::new(subscriber),
            conn,
            prefix: config.prefix.clone(),
            retention_ms: config.retention.as_millis() as i64,
            scripts: std::sync::Arc::new(Scripts {
                create: Script::new(CREATE_LUA),
                apply: Script::new(APPLY_LUA),
                claim_due: Script::new(CLAIM_DUE_LUA),
                ack_due: Script::new(ACK_DUE_LUA),
                purge: Script::new(PURGE_LUA),
            }),
        })
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for p in parts {
            key.push_str(p);
        }
        key
    }

    fn job_key(&self, id: &str) -> String {
        self.key(&["job:", id])
    }

    fn hist_key(&self, id: &str) -> String {
        self.key(&["hist:", id])
    }

    /// The index a query reads: its namespace's index of its most
    /// selective filter.
    fn index_key(&self, query: &ListQuery) -> String {
        let ns = crate::validate::namespace_or_default(&query.namespace);
        if let Some(state) = query.state {
            return self.key(&["idx:", ns, ":state:", state.as_str()]);
        }
        if let Some(kind) = &query.kind {
            return self.key(&["idx:", ns, ":kind:", kind]);
        }
        if let Some(queue) = &query.queue {
            return self.key(&["idx:", ns, ":queue:", queue]);
        }
        self.key(&["idx:", ns, ":all"])
    }

    /// The keys and arguments of the create script for one job, and the
    /// job as it will be once stored.
    fn prepare_create(&self, id: Uuid, new: &NewJob, now_ms: i64, due_ms: i64) -> PreparedCreate {
        let id_str = id.to_string();
        let job = new.to_job(&id_str, now_ms);
        let base = Job {
            state: 0,
            updated_at: None,
            ..job.clone()
        };
        let member = index_member(now_ms, &id_str);
        let created = new.created_transition(now_ms);
        let ns = job.namespace.as_str();
        let keys = vec![
            self.job_key(&id_str),
            self.hist_key(&id_str),
            self.key(&["idem:", ns, ":", &new.idempotency_key]),
            self.key(&["due"]),
            self.key(&["idx:", ns, ":all"]),
            self.key(&["idx:", ns, ":state:", State::Created.as_str()]),
            self.key(&["idx:", ns, ":kind:", &new.kind]),
            self.key(&["idx:", ns, ":queue:", &new.queue]),
            self.key(&["namespaces"]),
        ];
        let use_idem = if new.idempotency_key.is_empty() {
            "0"
        } else {
            "1"
        };
        let text = |s: &str| s.as_bytes().to_vec();
        let args: Vec<Vec<u8>> = vec![
            text(&id_str),
            text(use_idem),
            text(&member),
            created.encode_to_vec(),
            text(&due_ms.to_string()),
            text(ns),
            text("id"),
            text(&id_str),
            text("base"),
            base.encode_to_vec(),
            text("state"),
            text(State::Created.as_str()),
            text("attempt"),
            text("0"),
            text("updated"),
            text(&now_ms.to_string()),
            text("ix"),
            text(&member),
            text("kind"),
            text(&new.kind),
            text("queue"),
            text(&new.queue),
            text("idem"),
            text(&new.idempotency_key),
            text("ns"),
            text(ns),
            text("max"),
            text(&new.max_attempts.to_string()),
        ];
        PreparedCreate {
            keys,
            args,
            job: Job {
                history: vec![created],
                ..job
            },
        }
    }

    /// The hash fields `change` writes and deletes, and its arguments for
    /// the sorted sets it moves.
    fn written(&self, change: &Change) -> Written {
        let mut set: Vec<(&'static str, Vec<u8>)> = Vec::new();
        if let Some(to) = change.to {
            // Written even when unchanged: the script moves the index entry
            // only when the state differs.
            set.push(("state", to.as_str().as_bytes().to_vec()));
        }
        if !change.silent {
            set.push(("updated", change.at_ms.to_string().into_bytes()));
        }
        let mut del: Vec<&'static str> = Vec::new();
        if let Some(attempt) = change.attempt {
            set.push(("attempt", attempt.to_string().into_bytes()));
        }
        match change.cancel_requested {
            Some(true) => set.push(("cancel", b"1".to_vec())),
            Some(false) => del.push("cancel"),
            None => {}
        }
        if let Some(error) = &change.error {
            set.push(("error", error.clone().into_bytes()));
        }
        if let Some(result) = &change.result {
            set.push(("result", result.encode_to_vec()));
        }
        if change.started {
            set.push(("started", change.at_ms.to_string().into_bytes()));
        }
        if change.finished {
            set.push(("finished", change.at_ms.to_string().into_bytes()));
        }
        match change.next_attempt_ms {
            Some(Some(ms)) => set.push(("next_at", ms.to_string().into_bytes())),
            Some(None) => del.push("next_at"),
            None => {}
        }
        match &change.worker_id {
            Some(Some(w)) => set.push(("worker", w.clone().into_bytes())),
            Some(None) => del.push("worker"),
            None => {}
        }
        let lease_arg = match &change.lease {
            LeaseChange::Keep => String::new(),
            LeaseChange::Clear => {
                del.push("lease");
                del.push("lease_exp");
                "-".to_owned()
            }
            LeaseChange::Set { token, expires_ms } => {
                set.push(("lease", token.clone().into_bytes()));
                set.push(("lease_exp", expires_ms.to_string().into_bytes()));
                expires_ms.to_string()
            }
            LeaseChange::Extend { expires_ms } => {
                set.push(("lease_exp", expires_ms.to_string().into_bytes()));
                expires_ms.to_string()
            }
        };
        let due_arg = match change.due {
            Due::Keep => String::new(),
            Due::Remove => "-".to_owned(),
            Due::At(ms) => ms.to_string(),
        };
        let retention_arg = match change.to {
            Some(to) if to.is_terminal() => (change.at_ms + self.retention_ms).to_string(),
            _ => String::new(),
        };
        Written {
            set,
            del,
            lease_arg,
            due_arg,
            retention_arg,
        }
    }

    /// Runs the apply script for `change`, whose hash writes are `written`;
    /// the reply holds what `read_back` asks for.
    async fn invoke_apply(
        &self,
        id: Uuid,
        change: &Change,
        written: &Written,
        read_back: ReadBack,
    ) -> Result<Value> {
        let id_str = id.to_string();
        let Written {
            set,
            del,
            lease_arg,
            due_arg,
            retention_arg,
        } = written;
        let mut invocation = self.scripts.apply.key(self.job_key(&id_str));
        invocation
            .key(self.hist_key(&id_str))
            .key(self.key(&["due"]))
            .key(self.key(&["leases"]))
            .key(self.key(&["retention"]))
            .arg(change.expect.map(State::as_str).unwrap_or(""))
            .arg(change.expect_lease.as_deref().unwrap_or(""))
            .arg(
                change
                    .expect_lease_expired_by
                    .map(|ms| ms.to_string())
                    .unwrap_or_default(),
            )
            .arg(change.to.map(State::as_str).unwrap_or(""))
            .arg(self.key(&["idx:"]))
            .arg(
                change
                    .history
                    .as_ref()
                    .map(Message::encode_to_vec)
                    .unwrap_or_default(),
            )
            .arg(due_arg)
            .arg(lease_arg)
            .arg(retention_arg)
            .arg(if change.silent {
                String::new()
            } else {
                self.subscriber.publish_arg(&id_str)
            })
            .arg(
                change
                    .expect_attempt
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            )
            .arg(change.expect_namespace.as_deref().unwrap_or(""))
            .arg(set.len())
            .arg(read_back.arg())
            .arg(match change.expect_cancel_requested {
                None => "",
                Some(true) => "1",
                Some(false) => "0",
            });
        for (name, value) in set {
            invocation.arg(*name).arg(value.as_slice());
        }
        for name in del {
            invocation.arg(*name);
        }
        let mut conn = self.conn.clone();
        Ok(invocation.invoke_async(&mut conn).await?)
    }

    async fn read_many(&self, ids: &[String]) -> Result<Vec<Option<Job>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(self.job_key(id))
                .lrange(self.hist_key(id), 0, -1);
        }
        let mut conn = self.conn.clone();
        let raw: Vec<Value> = pipe.query_async(&mut conn).await?;
        raw.chunks(2)
            .map(|pair| {
                let fields = Fields::of(&pair[0])?;
                if fields.is_empty() {
                    Ok(None)
                } else {
                    decode_job(&fields, pair.get(1)).map(Some)
                }
            })
            .collect()
    }
}

/// One job's create script call, ready to be pipelined.
struct PreparedCreate {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    job: Job,
}

impl PreparedCreate {
    fn command(&self, sha: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(self.keys.len());
        for key in &self.keys {
            cmd.arg(key);
        }
        for arg in &self.args {
            cmd.arg(arg.as_slice());
        }
        cmd
    }
}

fn index_member(created_ms: i64, id: &str) -> String {
    format!("{created_ms:013}:{id}")
}

fn encode_token(member: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(member)
}

fn decode_token(token: &str) -> Result<String> {
    let bad = || Error::invalid("page_token", "is not a token returned by ListJobs");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let member = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ms, id) = member.split_once(':').ok_or_else(bad)?;
    if ms.len() != 13 || !ms.bytes().all(|b| b.is_ascii_digit()) || Uuid::try_parse(id).is_err() {
        return Err(bad());
    }
    Ok(member)
}

/// What one change writes: hash fields set and deleted, and the apply
/// script's arguments for the due-set, the lease set and retention.
struct Written {
    set: Vec<(&'static str, Vec<u8>)>,
    del: Vec<&'static str>,
    lease_arg: String,
    due_arg: String,
    retention_arg: String,
}

/// A job's hash as HGETALL returns it (a flat field, value, … array),
/// borrowed from the reply: decoding a job copies no field it does not keep.
struct Fields<'a>(Vec<(&'a [u8], &'a [u8])>);

impl<'a> Fields<'a> {
    fn of(reply: &'a Value) -> Result<Self> {
        let items = match reply {
            Value::Array(items) => items.as_slice(),
            Value::Nil => &[],
            _ => return Err(corrupt("the job hash is not an array")),
        };
        items
            .chunks(2)
            .map(|pair| match pair {
                [name, value] => Ok((bulk(name)?, bulk(value)?)),
                _ => Err(corrupt("a field without a value")),
            })
            .collect::<Result<_>>()
            .map(Fields)
    }

    /// The fields of the apply script's `'p'` reply (nil for a field the
    /// job lacks), with `written` applied to them: the hash as the script
    /// left it, as far as [`decode_job`] reads it.
    fn pre_image_with(reply: &'a Value, written: &'a Written) -> Result<Self> {
        let Value::Array(values) = reply else {
            return Err(corrupt("the job's fields are not an array"));
        };
        if values.len() != PRE_IMAGE_FIELDS.len() {
            return Err(corrupt("the job's fields are incomplete"));
        }
        let mut fields = Vec::with_capacity(values.len());
        for (name, value) in PRE_IMAGE_FIELDS.iter().zip(values) {
            if *value != Value::Nil {
                fields.push((name.as_bytes(), bulk(value)?));
            }
        }
        let mut fields = Fields(fields);
        for (name, value) in &written.set {
            fields.remove(name);
            fields.0.push((name.as_bytes(), value.as_slice()));
        }
        for name in &written.del {
            fields.remove(name);
        }
        Ok(fields)
    }

    fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| *k != name.as_bytes());
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.0
            .iter()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| *v)
    }

    fn str(&self, name: &str) -> Option<&'a str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn i64(&self, name: &str) -> Option<i64> {
        self.str(name).and_then(|s| s.parse().ok())
    }
}

fn bulk(value: &Value) -> Result<&[u8]> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(s) => Ok(s.as_bytes()),
        _ => Err(corrupt("a field that is not a string")),
    }
}

fn corrupt(what: &str) -> Error {
    Error::Internal(format!("corrupt job record: {what}"))
}

/// Rebuilds a job from its hash fields and its history list (LRANGE's
/// reply; none is an empty history).
fn decode_job(fields: &Fields<'_>, history: Option<&Value>) -> Result<Job> {
    let base = fields.get("base").ok_or_else(|| corrupt("no base"))?;
    let mut job = Job::decode(base).map_err(|e| corrupt(&e.to_string()))?;
    let state = fields
        .str("state")
        .and_then(State::from_name)
        .ok_or_else(|| corrupt("bad state"))?;
    job.state = state.to_proto() as i32;
    job.attempt = fields.i64("attempt").unwrap_or(0) as u32;
    job.cancel_requested = fields.str("cancel") == Some("1");
    job.error = fields.str("error").unwrap_or_default().to_owned();
    job.worker_id = fields.str("worker").unwrap_or_default().to_owned();
    job.result = fields
        .get("result")
        .map(pbjson_types::Struct::decode)
        .transpose()
        .map_err(|e| corrupt(&e.to_string()))?;
    job.updated_at = fields.i64("updated").map(ms_to_timestamp);
    job.started_at = fields.i64("started").map(ms_to_timestamp);
    job.finished_at = fields.i64("finished").map(ms_to_timestamp);
    job.next_attempt_at = fields.i64("next_at").map(ms_to_timestamp);
    job.history = match history {
        Some(Value::Array(entries)) => entries
            .iter()
            .map(|entry| Transition::decode(bulk(entry)?).map_err(|e| corrupt(&e.to_string())))
            .collect::<Result<_>>()?,
        None | Some(Value::Nil) => Vec::new(),
        Some(_) => return Err(corrupt("the history is not a list")),
    };
    Ok(job)
}

/// Decodes the apply script's reply; `written` makes the `Done` value from
/// the rest of the reply (the job and its history, when asked for).
fn decode_apply_reply<T>(
    reply: Value,
    written: impl FnOnce(&[Value]) -> Result<T>,
) -> Result<Applied<T>> {
    let items: Vec<Value> = redis::from_redis_value(reply)?;
    let code: i64 =
        redis::from_redis_value_ref(items.first().ok_or_else(|| corrupt("empty reply"))?)?;
    match code {
        1 => Ok(Applied::Done(written(&items[1..])?)),
        0 => {
            let actual: String = redis::from_redis_value_ref(&items[1])?;
            let lease: i64 = redis::from_redis_value_ref(&items[2])?;
            Ok(Applied::Conflict {
                actual: State::from_name(&actual).ok_or_else(|| corrupt("bad state"))?,
                lease_mismatch: lease == 1,
            })
        }
        _ => Ok(Applied::NotFound),
    }
}

#[async_trait]
impl JobStore for RedisStore {
    async fn create(&self, id: Uuid, new: &NewJob, now_ms: i64, due_ms: i64) -> Result<Created> {
        let mut created = self
            .create_many(&[(id, new.clone())], now_ms, due_ms)
            .await?;
        created
            .pop()
            .ok_or_else(|| Error::Internal("no reply to a create".into()))
    }

    async fn create_many(
        &self,
        jobs: &[(Uuid, NewJob)],
        now_ms: i64,
        due_ms: i64,
    ) -> Result<Vec<Created>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let prepared: Vec<PreparedCreate> = jobs
            .iter()
            .map(|(id, new)| self.prepare_create(*id, new, now_ms, due_ms))
            .collect();
        let mut conn = self.conn.clone();
        // One round trip for the whole batch: EVALSHA per job, pipelined;
        // the script is loaded once if Redis does not know it (a restart).
        let mut loaded = false;
        let replies: Vec<Vec<Value>> = loop {
            let mut pipe = redis::pipe();
            for p in &prepared {
                pipe.add_command(p.command(self.scripts.create.get_hash()));
            }
            match pipe.query_async(&mut conn).await {
                Ok(replies) => break replies,
                Err(e)
                    if !loaded
                        && e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    let _: String = redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(CREATE_LUA)
                        .query_async(&mut conn)
                        .await?;
                    loaded = true;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut out = Vec::with_capacity(prepared.len());
        for (p, reply) in prepared.into_iter().zip(replies) {
            let code: i64 = redis::from_redis_value_ref(&reply[0])?;
            out.push(match code {
                1 => Created::New(Box::new(p.job)),
                0 => {
                    let existing: String = redis::from_redis_value_ref(&reply[1])?;
                    let existing_id =
                        Uuid::try_parse(&existing).map_err(|_| corrupt("idempotency key"))?;
                    match self.get(existing_id).await? {
                        Some(job) => Created::Existing(Box::new(job)),
                        None => {
                            return Err(Error::Conflict(format!(
                                "idempotency key {:?} belongs to job {existing}, which was just deleted",
                                p.job.idempotency_key
                            )));
                        }
                    }
                }
                _ => return Err(Error::Conflict(format!("job id {} already exists", p.job.id))),
            });
        }
        Ok(out)
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>> {
        Ok(self.read_many(&[id.to_string()]).await?.pop().flatten())
    }

    async fn list(&self, query: &ListQuery) -> Result<Page> {
        let index = self.index_key(query);
        let mut cursor = match &query.page_token {
            Some(token) => format!("({}", decode_token(token)?),
            None => "+".to_owned(),
        };
        let want = query.page_size as usize;
        let mut jobs = Vec::with_capacity(want);
        let mut scanned = 0usize;
        let mut conn = self.conn.clone();
        loop {
            let batch = want.max(50).min(MAX_LIST_SCAN - scanned).max(1);
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(&index)
                .arg(&cursor)
                .arg("-")
                .arg("BYLEX")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(batch)
                .query_async(&mut conn)
                .await?;
            let exhausted = members.len() < batch;
            let ids: Vec<String> = members
                .iter()
                .filter_map(|m| m.split_once(':').map(|(_, id)| id.to_owned()))
                .collect();
            let found = self.read_many(&ids).await?;
            for (i, (member, job)) in members.iter().zip(found).enumerate() {
                scanned += 1;
                cursor = format!("({member}");
                // A job purged between the index read and the job read is skipped.
                if let Some(job) = job.filter(|j| query.matches(j)) {
                    jobs.push(job);
                    if jobs.len() == want {
                        let more = !exhausted || i + 1 < members.len();
                        return Ok(Page {
                            jobs,
                            next_page_token: more.then(|| encode_token(member)),
                        });
                    }
                }
            }
            if exhausted {
                return Ok(Page {
                    jobs,
                    next_page_token: None,
                });
            }
            if scanned >= MAX_LIST_SCAN {
                let last = cursor.trim_start_matches('(').to_owned();
                return Ok(Page {
                    jobs,
                    next_page_token: Some(encode_token(&last)),
                });
            }
        }
    }

    async fn apply(&self, id: Uuid, change: &Change) -> Result<Applied> {
        let written = self.written(change);
        let reply = self
            .invoke_apply(id, change, &written, ReadBack::Full)
            .await?;
        let applied = decode_apply_reply(reply, |rest| {
            let fields = Fields::of(rest.first().ok_or_else(|| corrupt("no job in the reply"))?)?;
            Ok(Box::new(decode_job(&fields, rest.get(1))?))
        })?;
        if let Applied::Done(job) = &applied
            && !change.silent
        {
            // Watchers here get the job as written, without reading it
            // back; the PUBLISH tells the other replicas (the subscriber
            // skips this store's own).
            self.subscriber.hub().notify(id, || {
                Notice::Snapshot(std::sync::Arc::new((**job).clone()))
            });
        }
        Ok(applied)
    }

    async fn apply_blind(&self, id: Uuid, change: &Change) -> Result<Applied<()>> {
        // A job watched here is read back after all, so that its watchers
        // get it without a read of their own (the latency of a watched job).
        if !change.silent && self.subscriber.hub().is_watched(id) {
            return Ok(self.apply(id, change).await?.map(|_| ()));
        }
        let written = self.written(change);
        let reply = self
            .invoke_apply(id, change, &written, ReadBack::None)
            .await?;
        let applied = decode_apply_reply(reply, |_| Ok(()))?;
        if matches!(applied, Applied::Done(())) && !change.silent {
            // A watch that began since the check above.
            self.subscriber.hub().notify(id, || Notice::Reread);
        }
        Ok(applied)
    }

    async fn apply_without_history(&self, id: Uuid, change: &Change) -> Result<Applied> {
        // A job watched here is read back in full, as in `apply_blind`.
        if !change.silent && self.subscriber.hub().is_watched(id) {
            return Ok(self.apply(id, change).await?.without_history());
        }
        let written = self.written(change);
        let reply = self
            .invoke_apply(id, change, &written, ReadBack::PreImage)
            .await?;
        let applied = decode_apply_reply(reply, |rest| {
            let before = rest.first().ok_or_else(|| corrupt("no job in the reply"))?;
            Ok(Box::new(decode_job(
                &Fields::pre_image_with(before, &written)?,
                None,
            )?))
        })?;
        if matches!(applied, Applied::Done(_)) && !change.silent {
            self.subscriber.hub().notify(id, || Notice::Reread);
        }
        Ok(applied)
    }

    async fn claim_due(
        &self,
        now_ms: i64,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<DueJob>> {
        let mut conn = self.conn.clone();
        let rows: Vec<(String, String, String, String, String, String)> = self
            .scripts
            .claim_due
            .key(self.key(&["due"]))
            .arg(now_ms)
            .arg(claim_until_ms)
            .arg(limit)
            .arg(self.key(&["job:"]))
            .invoke_async(&mut conn)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, kind, queue, attempt, namespace, max)| {
                Some(DueJob {
                    id: Uuid::try_parse(&id).ok()?,
                    kind,
                    queue,
                    namespace,
                    // 0 (unknown, a job stored before the field existed)
                    // makes workers take the read-first path.
                    max_attempts: max.parse().unwrap_or(0),
                    attempt: attempt.parse().unwrap_or(0),
                    claim: claim_until_ms,
                })
            })
            .collect())
    }

    async fn ack_due(&self, acks: &[(Uuid, i64)]) -> Result<()> {
        if acks.is_empty() {
            return Ok(());
        }
        let mut invocation = self.scripts.ack_due.key(self.key(&["due"]));
        for (id, claim) in acks {
            invocation.arg(id.to_string()).arg(*claim);
        }
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn expired_leases(&self, now_ms: i64, limit: usize) -> Result<Vec<ExpiredLease>> {
        let mut conn = self.conn.clone();
        let rows: Vec<(String, f64)> = conn
            .zrangebyscore_limit_withscores(
                self.key(&["leases"]),
                "-inf",
                now_ms,
                0,
                limit as isize,
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, score)| {
                Some(ExpiredLease {
                    id: Uuid::try_parse(&id).ok()?,
                    expired_ms: score as i64,
                })
            })
            .collect())
    }

    async fn purge_expired(&self, now_ms: i64, limit: usize) -> Result<usize> {
        let mut conn = self.conn.clone();
        let purged: usize = self
            .scripts
            .purge
            .key(self.key(&["retention"]))
            .arg(now_ms)
            .arg(limit)
            .arg(&self.prefix)
            .invoke_async(&mut conn)
            .await?;
        Ok(purged)
    }

    async fn changes(&self, id: Uuid) -> Result<BoxStream<'static, Notice>> {
        self.subscriber.watch(id).await
    }

    async fn namespaces(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn.smembers(self.key(&["namespaces"])).await?;
        names.sort();
        Ok(names)
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}

/// Used by tests and tools to start from a clean slate: deletes every key
/// under the store's prefix.
impl RedisStore {
    /// Deletes every key under the prefix (SCAN-based; for tests and tools,
    /// never called by the server).
    pub async fn wipe(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", self.prefix);
        let keys: Vec<String> = {
            let mut iter: redis::AsyncIter<'_, String> = conn.scan_match(&pattern).await?;
            let mut keys = Vec::new();
            while let Some(key) = iter.next_item().await {
                keys.push(key?);
            }
            keys
        };
        if !keys.is_empty() {
            let _: () = conn.del(keys).await?;
        }
        Ok(())
    }
}
