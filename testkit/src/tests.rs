//! Real-process tests of the servers: they start `redis-server` and
//! RabbitMQ nodes, so they need `scripts/install-deps.sh`.

use super::*;

/// Sends the AMQP 0-9-1 protocol header and checks that the broker answers
/// with a method frame (`Connection.Start`).
fn amqp_handshake(port: u16) -> io::Result<()> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"AMQP\x00\x00\x09\x01")?;
    let mut header = [0u8; 7];
    io::Read::read_exact(&mut stream, &mut header)?;
    // Frame type 1 (method) on channel 0.
    if header[0] == 1 && header[1..3] == [0, 0] {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "unexpected frame header {header:?}"
        )))
    }
}

fn get(port: u16, key: &str) -> Resp {
    redis_command(port, &["GET", key]).expect("GET")
}

#[test]
fn unique_names_differ_and_keep_the_prefix() {
    let a = unique_name("jobs");
    let b = unique_name("jobs");
    assert_ne!(a, b);
    assert!(
        a.starts_with("jobs-") && a.len() == "jobs-".len() + 10,
        "{a}"
    );
    assert!(
        a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'),
        "{a}"
    );
    assert_eq!(unique_name("").len(), 10);
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let ports: BTreeSet<u16> = (0..20).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 20);
    for port in ports {
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("free port is bindable");
    }
}

#[test]
fn redis_data_survives_kill_and_restart() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    let dir = redis.data_dir().to_path_buf();

    let key = unique_name("testkit");
    assert_eq!(
        redis_command(port, &["SET", &key, "survives"]).unwrap(),
        Resp::Simple("OK".into())
    );

    redis.kill();
    assert!(!port_open(port), "port closed after kill()");
    assert!(!redis.is_running());

    redis.start_again();
    assert_eq!(redis.port(), port);
    assert_eq!(get(port, &key), Resp::Bulk(Some(b"survives".to_vec())));

    // Graceful stop and restart keeps the data too.
    redis_command(port, &["SET", &key, "again"]).unwrap();
    redis.stop();
    assert!(!port_open(port), "port closed after stop()");
    redis.start_again();
    assert_eq!(get(port, &key), Resp::Bulk(Some(b"again".to_vec())));

    drop(redis);
    assert!(!port_open(port), "port closed after drop");
    assert!(!dir.exists(), "data dir removed on drop");
}

#[test]
fn two_redis_servers_are_independent() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    redis_command(a.port(), &["SET", "k", "a"]).unwrap();
    assert_eq!(get(b.port(), "k"), Resp::Bulk(None));
}

#[test]
fn shared_redis_is_one_server_per_process() {
    let url = shared_redis_url();
    assert_eq!(url, shared_redis_url());
    let port: u16 = url
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .expect("port in shared URL");
    assert_eq!(
        redis_command(port, &["PING"]).unwrap(),
        Resp::Simple("PONG".into())
    );
}

#[test]
fn rabbitmq_starts_survives_kill_and_restarts() {
    let started = Instant::now();
    let mut rabbit = RabbitServer::start();
    eprintln!("RabbitMQ node ready in {:?}", started.elapsed());
    let port = rabbit.port();
    assert_eq!(
        rabbit.url(),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    );
    assert!(rabbit.node_name().starts_with("orchtest-"));
    amqp_handshake(port).expect("AMQP handshake after start");
    let dir = rabbit.data_dir().to_path_buf();
    let epmd_port = rabbit.epmd_port;

    // Something stored in Mnesia, to prove the restart reuses the data.
    let vhost = unique_name("vh");
    let out = rabbit.rabbitmqctl(&["add_vhost", &vhost]);
    assert!(out.status.success(), "add_vhost: {out:?}");

    rabbit.kill();
    assert!(!port_open(port), "AMQP port closed after kill()");
    assert!(rabbit.beam_pids().is_empty(), "no VM left after kill()");

    let restarted = Instant::now();
    rabbit.start_again();
    eprintln!("RabbitMQ node restarted in {:?}", restarted.elapsed());
    assert_eq!(rabbit.port(), port);
    amqp_handshake(port).expect("AMQP handshake after start_again");
    let out = rabbit.rabbitmqctl(&["-q", "list_vhosts"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&vhost),
        "vhost survived the kill: {out:?}"
    );

    let stopping = Instant::now();
    rabbit.stop();
    eprintln!("RabbitMQ node stopped in {:?}", stopping.elapsed());
    assert!(!port_open(port), "AMQP port closed after stop()");

    drop(rabbit);
    assert!(!port_open(epmd_port), "epmd gone after drop");
    assert!(!dir.exists(), "data dir removed on drop");
}

#[test]
fn shared_amqp_is_one_broker_per_process() {
    let url = shared_amqp_url();
    assert_eq!(url, shared_amqp_url());
    let port: u16 = url
        .trim_start_matches("amqp://guest:guest@127.0.0.1:")
        .trim_end_matches("/%2f")
        .parse()
        .expect("port in shared URL");
    amqp_handshake(port).expect("AMQP handshake with the shared broker");
}
