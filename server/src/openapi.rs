//! The OpenAPI 3.0.3 description of the REST shim, derived from the
//! protobuf contract so that it cannot drift from it.
//!
//! [`document`] decodes [`orchestrator::proto::FILE_DESCRIPTOR_SET`] with
//! prost-reflect and walks every service whose methods carry a
//! `google.api.http` option (`WorkerService` has none and is left out):
//!
//! - each HTTP binding (including `additional_bindings`) becomes an
//!   operation: the verb and path template of the rule (`{job_id}` kept as a
//!   path parameter, custom verbs such as `/jobs/{job_id}:watch` kept
//!   literally), a JSON request body when the rule has `body`, and the
//!   remaining request fields as query parameters (lowerCamelCase names)
//!   when it does not take the whole message as body;
//! - the `operationId` is the method name, the summary and description come
//!   from the method's comment in the proto;
//! - `200` is the output message (`application/x-ndjson` lines of
//!   `{"result": ...}` / `{"error": ...}` for server-streaming methods) and
//!   `default` is the grpc-gateway error body, `google.rpc.Status`;
//! - every operation requires the `bearerAuth` security scheme (HTTP bearer,
//!   the tokens of `orchd token new`) and lists the error answers of
//!   authentication (401, 403), the request limits (413 for a body over
//!   `max_request_bytes`, 429 for the per-token limits of the operations in
//!   `LIMITED`, with `Retry-After`) and the request timeout (504);
//!   `/healthz` and `/openapi.json`, which are not in the contract, stay
//!   open;
//! - `components/schemas` holds every message reachable from those methods,
//!   named by full proto name (`orchestrator.v1.Job`), following the proto3
//!   JSON mapping: json_name properties, 64-bit integers as strings, enums as
//!   string enums, maps as objects, and the well-known types inline
//!   (`Timestamp` as a date-time string, `Duration` as `"1.5s"`, `Struct` as
//!   a free-form object, `Value` as any JSON value, ...). Proto comments
//!   become descriptions.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::LazyLock;

use prost_reflect::{
    DescriptorPool, DynamicMessage, EnumDescriptor, FieldDescriptor, FileDescriptor, Kind,
    MessageDescriptor, MethodDescriptor,
};
use serde_json::{Map, Value, json};

/// The method option that maps an RPC onto HTTP (`google.api.http`, field
/// 72295728 of `google.protobuf.MethodOptions`).
const HTTP_OPTION: &str = "google.api.http";
/// Component name of the error body.
const STATUS_SCHEMA: &str = "google.rpc.Status";
/// `HttpRule` pattern fields that name an HTTP method directly.
const VERBS: [&str; 5] = ["get", "put", "post", "delete", "patch"];
/// Further methods a `custom` pattern may name that OpenAPI can describe.
const CUSTOM_VERBS: [&str; 3] = ["head", "options", "trace"];
/// Source-path of a file's `syntax` statement, whose comment heads the file.
const SYNTAX_PATH: [i32; 1] = [12];
/// Name of the security scheme of the protected operations.
const BEARER_SCHEME: &str = "bearerAuth";
/// The methods a per-token limit applies to, and what the 429 means there.
const LIMITED: [(&str, &str); 3] = [
    (
        "orchestrator.v1.JobService.SubmitJob",
        "The token's submit rate (`submit_rate`) is used up; retry after `Retry-After` seconds.",
    ),
    (
        "orchestrator.v1.JobService.SubmitJobs",
        "The token's submit rate (`submit_rate`, each job counts) is used up; retry after `Retry-After` seconds.",
    ),
    (
        "orchestrator.v1.JobService.WatchJob",
        "The token has `max_watches_per_token` watch streams open; close one first.",
    ),
];

static DOCUMENT: LazyLock<Value> = LazyLock::new(|| {
    let pool = DescriptorPool::decode(orchestrator::proto::FILE_DESCRIPTOR_SET)
        .expect("the contract's compiled FileDescriptorSet decodes");
    build(&pool)
});

/// The OpenAPI 3.0.3 document of the REST surface, built from the protobuf
/// descriptor of the contract (computed once, then cloned).
pub fn document() -> Value {
    DOCUMENT.clone()
}

/// Builds the document from any descriptor pool.
fn build(pool: &DescriptorPool) -> Value {
    let mut generator = Generator::new(pool);
    let mut paths = Map::new();
    let mut tags = Vec::new();
    let mut descriptions: Vec<String> = Vec::new();
    if let Some(http) = pool.get_extension_by_name(HTTP_OPTION) {
        for service in pool.services() {
            let annotated: Vec<(MethodDescriptor, Vec<Binding>)> = service
                .methods()
                .filter_map(|method| {
                    let options = method.options();
                    if !options.has_extension(&http) {
                        return None;
                    }
                    let rule = options.get_extension(&http);
                    let bindings = rule.as_message().map(bindings).unwrap_or_default();
                    (!bindings.is_empty()).then_some((method, bindings))
                })
                .collect();
            if annotated.is_empty() {
                continue;
            }
            let file = service.parent_file();
            if let Some(doc) = generator.comments.get(&file, &SYNTAX_PATH)
                && !descriptions.contains(&doc)
            {
                descriptions.push(doc);
            }
            let mut tag = json!({ "name": service.name() });
            if let Some(doc) = generator.comments.get(&file, service.path()) {
                tag["description"] = doc.into();
            }
            tags.push(tag);
            for (method, bindings) in annotated {
                generator.message_ref(&method.input());
                generator.message_ref(&method.output());
                for (i, binding) in bindings.iter().enumerate() {
                    let operation_id = match i {
                        0 => method.name().to_owned(),
                        _ => format!("{}{}", method.name(), i + 1),
                    };
                    let (path, operation) =
                        generator.operation(&method, binding, operation_id, service.name());
                    let item = paths.entry(path).or_insert_with(|| json!({}));
                    item[binding.verb] = operation;
                }
            }
        }
    }
    generator.drain();
    let mut schemas = generator.schemas;
    if !paths.is_empty() {
        schemas.insert(STATUS_SCHEMA.to_owned(), status_schema());
    }
    let mut info = json!({
        "title": "orchestrator",
        "version": env!("CARGO_PKG_VERSION"),
    });
    if !descriptions.is_empty() {
        info["description"] = descriptions.join("\n\n").into();
    }
    json!({
        "openapi": "3.0.3",
        "info": info,
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                BEARER_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token made by `orchd token new` (`orch_` and 64 hex digits), sent as `Authorization: Bearer <token>`; role client or admin. Needed only when orchd runs with --tokens-file.",
                },
            },
        },
    })
}

/// An error answer with the grpc-gateway error body.
fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": schema_ref(STATUS_SCHEMA) } },
    })
}

/// One HTTP binding of a method: a `google.api.HttpRule` without its
/// additional bindings.
#[derive(Debug)]
struct Binding {
    /// Lowercase HTTP method, as OpenAPI names it.
    verb: &'static str,
    /// The path template, e.g. `/jobs/{job_id}:watch`.
    template: String,
    /// `""` (no body), `"*"` (the whole request) or a request field name.
    body: String,
    /// `""` (the whole response) or a response field name.
    response_body: String,
}

/// The rule and its `additional_bindings`.
fn bindings(rule: &DynamicMessage) -> Vec<Binding> {
    let mut out: Vec<Binding> = binding(rule).into_iter().collect();
    if let Some(extra) = rule.get_field_by_name("additional_bindings")
        && let Some(list) = extra.as_list()
    {
        out.extend(
            list.iter()
                .filter_map(|v| v.as_message())
                .filter_map(binding),
        );
    }
    out
}

fn binding(rule: &DynamicMessage) -> Option<Binding> {
    let (verb, template) = match VERBS.iter().find(|verb| rule.has_field_by_name(verb)) {
        Some(verb) => (*verb, string_field(rule, verb)),
        None => {
            if !rule.has_field_by_name("custom") {
                return None;
            }
            let custom = rule.get_field_by_name("custom")?;
            let custom = custom.as_message()?;
            let kind = string_field(custom, "kind").to_ascii_lowercase();
            let verb = VERBS
                .iter()
                .chain(CUSTOM_VERBS.iter())
                .find(|verb| **verb == kind)?;
            (*verb, string_field(custom, "path"))
        }
    };
    (!template.is_empty()).then(|| Binding {
        verb,
        template,
        body: string_field(rule, "body"),
        response_body: string_field(rule, "response_body"),
    })
}

fn string_field(message: &DynamicMessage, name: &str) -> String {
    message
        .get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Turns a `google.api.http` path template into an OpenAPI path and the
/// field paths of its variables: `{name=shelves/*}` becomes `{name}`.
fn parse_template(template: &str) -> (String, Vec<String>) {
    let mut path = String::with_capacity(template.len());
    let mut vars = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        path.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            path.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let var = after[..end].split('=').next().unwrap_or_default().trim();
        path.push('{');
        path.push_str(var);
        path.push('}');
        vars.push(var.to_owned());
        rest = &after[end + 1..];
    }
    path.push_str(rest);
    (path, vars)
}

/// Finds a field by its dotted path of proto field names (`a.b`).
fn resolve_field(message: &MessageDescriptor, path: &str) -> Option<FieldDescriptor> {
    let mut message = message.clone();
    let mut field: Option<FieldDescriptor> = None;
    for part in path.split('.') {
        if let Some(parent) = field.take() {
            let Kind::Message(inner) = parent.kind() else {
                return None;
            };
            message = inner;
        }
        field = Some(message.get_field_by_name(part)?);
    }
    field
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// Adds a description (and deprecation) to a schema. A `$ref` cannot have
/// siblings in OpenAPI 3.0, so it is wrapped in `allOf` first.
fn annotate(schema: Value, description: Option<String>, deprecated: bool) -> Value {
    if description.is_none() && !deprecated {
        return schema;
    }
    let mut schema = if schema.get("$ref").is_some() {
        json!({ "allOf": [schema] })
    } else {
        schema
    };
    if let Some(description) = description {
        schema["description"] = description.into();
    }
    if deprecated {
        schema["deprecated"] = true.into();
    }
    schema
}

fn join_docs(first: Option<String>, second: Option<String>) -> Option<String> {
    match (first, second) {
        (Some(a), Some(b)) => Some(format!("{a}\n\n{b}")),
        (a, b) => a.or(b),
    }
}

/// Splits a method comment into a one-sentence summary and, when there is
/// more to it, the whole comment as description.
fn summary_and_description(doc: &str) -> (String, Option<String>) {
    let first_paragraph = doc.split("\n\n").next().unwrap_or_default();
    let flat = first_paragraph
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let summary = match flat.find(". ") {
        Some(end) => flat[..=end].to_owned(),
        None => flat,
    };
    let whole = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let description = (whole != summary).then(|| doc.to_owned());
    (summary, description)
}

/// Scalar types in the proto3 JSON mapping.
fn scalar_schema(kind: &Kind) -> Value {
    match kind {
        Kind::Double => json!({ "type": "number", "format": "double" }),
        Kind::Float => json!({ "type": "number", "format": "float" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32" })
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({ "type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX })
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({ "type": "string", "format": "int64" })
        }
        Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64" }),
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "format": "byte" }),
        Kind::Enum(enumeration) => enum_schema(enumeration),
        Kind::Message(_) => json!({}),
    }
}

fn enum_schema(enumeration: &EnumDescriptor) -> Value {
    if enumeration.full_name() == "google.protobuf.NullValue" {
        return json!({ "description": "Always `null`." });
    }
    let names: Vec<String> = enumeration.values().map(|v| v.name().to_owned()).collect();
    json!({ "type": "string", "enum": names })
}

/// The schema of a well-known type that the proto3 JSON mapping writes
/// specially, or `None` for an ordinary message.
fn well_known(message: &MessageDescriptor) -> Option<Value> {
    let schema = match message.full_name() {
        "google.protobuf.Timestamp" => json!({
            "type": "string",
            "format": "date-time",
            "example": "2025-01-01T12:00:00Z",
        }),
        "google.protobuf.Duration" => json!({
            "type": "string",
            "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
            "example": "1.5s",
        }),
        "google.protobuf.Struct" => json!({ "type": "object", "additionalProperties": true }),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({ "type": "array", "items": {} }),
        "google.protobuf.Empty" => json!({ "type": "object" }),
        "google.protobuf.FieldMask" => json!({ "type": "string" }),
        "google.protobuf.Any" => any_schema(),
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => {
            let mut schema = scalar_schema(&message.get_field_by_name("value")?.kind());
            schema["nullable"] = true.into();
            schema
        }
        _ => return None,
    };
    Some(schema)
}

/// Well-known types that travel as a single query-parameter string.
fn is_query_scalar(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"
    ) || (message.full_name().starts_with("google.protobuf.")
        && message.name().ends_with("Value")
        && !matches!(message.name(), "Value" | "ListValue"))
}

fn any_schema() -> Value {
    json!({
        "type": "object",
        "description": "A `google.protobuf.Any`: the message's fields plus its type URL in `@type`.",
        "properties": { "@type": { "type": "string" } },
        "required": ["@type"],
        "additionalProperties": true,
    })
}

/// The error body of the REST shim, as grpc-gateway writes it.
fn status_schema() -> Value {
    json!({
        "type": "object",
        "description": "An error, as grpc-gateway writes it (google.rpc.Status). The HTTP status follows the gRPC code, e.g. 400 for INVALID_ARGUMENT and FAILED_PRECONDITION, 404 for NOT_FOUND, 409 for ALREADY_EXISTS, 429 for RESOURCE_EXHAUSTED, 504 for DEADLINE_EXCEEDED; a body over the size limit gets 413.",
        "properties": {
            "code": {
                "type": "integer",
                "format": "int32",
                "description": "The gRPC status code (google.rpc.Code), e.g. 3 for INVALID_ARGUMENT, 5 for NOT_FOUND.",
            },
            "message": { "type": "string", "description": "What went wrong, for developers." },
            "details": { "type": "array", "items": any_schema() },
        },
    })
}

/// Comments from `source_code_info`, by file name and element path.
struct Comments(HashMap<(String, Vec<i32>), String>);

impl Comments {
    fn new(pool: &DescriptorPool) -> Self {
        let mut comments = HashMap::new();
        for file in pool.files() {
            let proto = file.file_descriptor_proto();
            let Some(info) = &proto.source_code_info else {
                continue;
            };
            for location in &info.location {
                let mut text = location
                    .leading_comments
                    .as_deref()
                    .or(location.trailing_comments.as_deref())
                    .map(clean_comment)
                    .unwrap_or_default();
                if text.is_empty() && location.path == SYNTAX_PATH {
                    text = location
                        .leading_detached_comments
                        .iter()
                        .map(|c| clean_comment(c))
                        .filter(|c| !c.is_empty())
                        .collect::<Vec<_>>()
                        .join("\n\n");
                }
                if !text.is_empty() {
                    comments.insert((file.name().to_owned(), location.path.clone()), text);
                }
            }
        }
        Comments(comments)
    }

    fn get(&self, file: &FileDescriptor, path: &[i32]) -> Option<String> {
        self.0
            .get(&(file.name().to_owned(), path.to_vec()))
            .cloned()
    }
}

/// Removes the common indentation and surrounding blank lines of a comment.
fn clean_comment(raw: &str) -> String {
    let lines: Vec<&str> = raw.lines().map(str::trim_end).collect();
    let indent = lines
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let lines: Vec<&str> = lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or_default())
        .collect();
    lines.join("\n").trim_matches('\n').to_owned()
}

struct Generator {
    comments: Comments,
    schemas: Map<String, Value>,
    pending: VecDeque<MessageDescriptor>,
    queued: HashSet<String>,
}

impl Generator {
    fn new(pool: &DescriptorPool) -> Self {
        Generator {
            comments: Comments::new(pool),
            schemas: Map::new(),
            pending: VecDeque::new(),
            queued: HashSet::new(),
        }
    }

    /// A reference to the message's component (queued for generation), or
    /// the inline schema of a well-known type.
    fn message_ref(&mut self, message: &MessageDescriptor) -> Value {
        if let Some(schema) = well_known(message) {
            return schema;
        }
        let name = message.full_name();
        if self.queued.insert(name.to_owned()) {
            self.pending.push_back(message.clone());
        }
        schema_ref(name)
    }

    /// Generates the components of every queued message, and of those they
    /// reach.
    fn drain(&mut self) {
        while let Some(message) = self.pending.pop_front() {
            let schema = self.message_schema(&message);
            self.schemas.insert(message.full_name().to_owned(), schema);
        }
    }

    fn kind_schema(&mut self, kind: &Kind) -> Value {
        match kind {
            Kind::Message(message) => self.message_ref(message),
            other => scalar_schema(other),
        }
    }

    fn message_schema(&mut self, message: &MessageDescriptor) -> Value {
        let mut properties = Map::new();
        for field in message.fields() {
            let (schema, mut description) = self.field_parts(&field);
            if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic()) {
                let members: Vec<String> = oneof
                    .fields()
                    .map(|f| format!("`{}`", f.json_name()))
                    .collect();
                let note = format!(
                    "Member of the oneof `{}`: at most one of {} is set.",
                    oneof.name(),
                    members.join(", ")
                );
                description = join_docs(description, Some(note));
            }
            properties.insert(
                field.json_name().to_owned(),
                annotate(schema, description, is_deprecated(&field)),
            );
        }
        let mut schema = json!({ "type": "object", "properties": properties });
        if let Some(doc) = self.comments.get(&message.parent_file(), message.path()) {
            schema["description"] = doc.into();
        }
        schema
    }

    /// A field's schema, its description kept apart.
    fn field_parts(&mut self, field: &FieldDescriptor) -> (Value, Option<String>) {
        let kind = field.kind();
        let (schema, element) = match &kind {
            Kind::Message(entry) if field.is_map() => {
                let value = entry.map_entry_value_field().kind();
                let schema =
                    json!({ "type": "object", "additionalProperties": self.kind_schema(&value) });
                (schema, value)
            }
            _ if field.is_list() => (
                json!({ "type": "array", "items": self.kind_schema(&kind) }),
                kind.clone(),
            ),
            _ => (self.kind_schema(&kind), kind.clone()),
        };
        let mut description = self.comments.get(&field.parent_file(), field.path());
        if let Kind::Enum(enumeration) = &element {
            description = join_docs(description, self.enum_doc(enumeration));
        }
        (schema, description)
    }

    fn field_schema(&mut self, field: &FieldDescriptor) -> Value {
        let (schema, description) = self.field_parts(field);
        annotate(schema, description, is_deprecated(field))
    }

    /// The enum's comment and one line per commented value.
    fn enum_doc(&self, enumeration: &EnumDescriptor) -> Option<String> {
        let doc = self
            .comments
            .get(&enumeration.parent_file(), enumeration.path());
        let values: Vec<String> = enumeration
            .values()
            .filter_map(|value| {
                let doc = self.comments.get(&value.parent_file(), value.path())?;
                let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
                Some(format!("- `{}`: {doc}", value.name()))
            })
            .collect();
        join_docs(doc, (!values.is_empty()).then(|| values.join("\n")))
    }

    fn operation(
        &mut self,
        method: &MethodDescriptor,
        binding: &Binding,
        operation_id: String,
        tag: &str,
    ) -> (String, Value) {
        let (path, vars) = parse_template(&binding.template);
        let input = method.input();
        let output = method.output();
        let mut operation = Map::new();
        operation.insert("operationId".into(), operation_id.into());
        operation.insert("tags".into(), json!([tag]));
        if let Some(doc) = self.comments.get(&method.parent_file(), method.path()) {
            let (summary, description) = summary_and_description(&doc);
            operation.insert("summary".into(), summary.into());
            if let Some(description) = description {
                operation.insert("description".into(), description.into());
            }
        }
        let deprecated = method
            .method_descriptor_proto()
            .options
            .as_ref()
            .is_some_and(|o| o.deprecated());
        if deprecated {
            operation.insert("deprecated".into(), true.into());
        }

        let mut parameters = Vec::new();
        for var in &vars {
            let (schema, description) = match resolve_field(&input, var) {
                Some(field) => self.field_parts(&field),
                None => (json!({ "type": "string" }), None),
            };
            let mut parameter =
                json!({ "name": var, "in": "path", "required": true, "schema": schema });
            if let Some(description) = description {
                parameter["description"] = description.into();
            }
            parameters.push(parameter);
        }

        let mut bound: HashSet<String> = vars.iter().cloned().collect();
        let body_schema = match binding.body.as_str() {
            "" => None,
            "*" => {
                let in_path: HashSet<&str> = vars
                    .iter()
                    .filter(|v| !v.contains('.'))
                    .map(String::as_str)
                    .collect();
                if in_path.is_empty() {
                    Some(self.message_ref(&input))
                } else {
                    let mut properties = Map::new();
                    for field in input.fields().filter(|f| !in_path.contains(f.name())) {
                        properties.insert(field.json_name().to_owned(), self.field_schema(&field));
                    }
                    Some(json!({ "type": "object", "properties": properties }))
                }
            }
            field_path => {
                bound.insert(field_path.to_owned());
                Some(match resolve_field(&input, field_path) {
                    Some(field) => self.field_schema(&field),
                    None => json!({}),
                })
            }
        };
        if binding.body != "*" {
            let mut stack = vec![input.full_name().to_owned()];
            self.query_parameters(&input, "", "", &bound, &mut stack, &mut parameters);
        }
        if !parameters.is_empty() {
            operation.insert("parameters".into(), parameters.into());
        }
        if let Some(schema) = body_schema {
            let content_type = if method.is_client_streaming() {
                "application/x-ndjson"
            } else {
                "application/json"
            };
            operation.insert(
                "requestBody".into(),
                json!({ "required": true, "content": { content_type: { "schema": schema } } }),
            );
        }

        let response = match resolve_field(&output, &binding.response_body) {
            Some(field) if !binding.response_body.is_empty() => self.field_schema(&field),
            _ => self.message_ref(&output),
        };
        let ok = if method.is_server_streaming() {
            let line = json!({
                "type": "object",
                "description": "One line of the stream: `result` for each message, or `error` once if the stream fails.",
                "properties": { "result": response, "error": schema_ref(STATUS_SCHEMA) },
            });
            json!({
                "description": format!(
                    "A stream of {} messages as newline-delimited JSON, one `{{\"result\": ...}}` object per line.",
                    output.full_name()
                ),
                "content": { "application/x-ndjson": { "schema": line } },
            })
        } else {
            json!({
                "description": "A successful response.",
                "content": { "application/json": { "schema": response } },
            })
        };
        let has_body = operation.contains_key("requestBody");
        let mut responses = json!({
            "200": ok,
            "401": error_response("UNAUTHENTICATED: the bearer token is missing, malformed or unknown (with `WWW-Authenticate: Bearer`)."),
            "403": error_response("PERMISSION_DENIED: the token's role may not call this."),
            "504": error_response("DEADLINE_EXCEEDED: the request took longer than `request_timeout`."),
            "default": error_response("An error; the HTTP status follows the gRPC code."),
        });
        if has_body {
            responses["413"] =
                error_response("The body is larger than `max_request_bytes`; nothing was done.");
        }
        if let Some((_, why)) = LIMITED.iter().find(|(name, _)| *name == method.full_name()) {
            let mut limited = error_response(&format!("RESOURCE_EXHAUSTED: {why}"));
            limited["headers"] = json!({
                "Retry-After": {
                    "description": "Seconds after which a retry can succeed, when the server knows.",
                    "schema": { "type": "integer", "minimum": 1 },
                },
            });
            responses["429"] = limited;
        }
        operation.insert("responses".into(), responses);
        operation.insert("security".into(), json!([{ BEARER_SCHEME: [] }]));
        (path, Value::Object(operation))
    }

    /// The request fields not bound by the path or the body, as query
    /// parameters: scalars, enums and their lists by json name, nested
    /// messages flattened as `parent.child`. Maps, lists of messages and
    /// free-form JSON cannot be written in a query and are left out.
    fn query_parameters(
        &mut self,
        message: &MessageDescriptor,
        json_prefix: &str,
        proto_prefix: &str,
        bound: &HashSet<String>,
        stack: &mut Vec<String>,
        out: &mut Vec<Value>,
    ) {
        for field in message.fields() {
            let proto_path = format!("{proto_prefix}{}", field.name());
            if bound.contains(&proto_path) || field.is_map() {
                continue;
            }
            let name = format!("{json_prefix}{}", field.json_name());
            if let Kind::Message(inner) = field.kind()
                && !is_query_scalar(&inner)
            {
                let skip = field.is_list()
                    || well_known(&inner).is_some()
                    || stack.iter().any(|seen| seen == inner.full_name());
                if !skip {
                    stack.push(inner.full_name().to_owned());
                    let (json_prefix, proto_prefix) =
                        (format!("{name}."), format!("{proto_path}."));
                    self.query_parameters(&inner, &json_prefix, &proto_prefix, bound, stack, out);
                    stack.pop();
                }
                continue;
            }
            let (schema, description) = self.field_parts(&field);
            let mut parameter =
                json!({ "name": name, "in": "query", "required": false, "schema": schema });
            if let Some(description) = description {
                parameter["description"] = description.into();
            }
            if is_deprecated(&field) {
                parameter["deprecated"] = true.into();
            }
            out.push(parameter);
        }
    }
}

fn is_deprecated(field: &FieldDescriptor) -> bool {
    field
        .field_descriptor_proto()
        .options
        .as_ref()
        .is_some_and(|o| o.deprecated())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
        let schema = &doc["components"]["schemas"][name];
        assert!(schema.is_object(), "no schema {name}");
        schema
    }

    fn param<'a>(operation: &'a Value, name: &str) -> &'a Value {
        operation["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("no parameter {name} in {operation}"))
    }

    #[test]
    fn openapi_paths_and_operations_follow_the_http_annotations() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.0.3");
        assert_eq!(doc["info"]["title"], "orchestrator");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let paths = doc["paths"].as_object().unwrap();
        assert!(
            !paths.is_empty(),
            "FILE_DESCRIPTOR_SET carries no google.api.http options: build.rs must write \
             protox's Compiler::encode_file_descriptor_set(), which keeps extension options"
        );
        let mut listed: Vec<(String, Vec<String>)> = paths
            .iter()
            .map(|(path, item)| {
                (
                    path.clone(),
                    item.as_object().unwrap().keys().cloned().collect(),
                )
            })
            .collect();
        listed.sort();
        let expected = [
            ("/jobs", vec!["get", "post"]),
            ("/jobs/{job_id}", vec!["delete", "get"]),
            ("/jobs/{job_id}:watch", vec!["get"]),
            ("/jobs:batchSubmit", vec!["post"]),
        ];
        let expected: Vec<(String, Vec<String>)> = expected
            .iter()
            .map(|(p, vs)| (p.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect();
        assert_eq!(listed, expected);

        let ids: Vec<&Value> = [
            &paths["/jobs"]["post"],
            &paths["/jobs"]["get"],
            &paths["/jobs/{job_id}"]["get"],
            &paths["/jobs/{job_id}"]["delete"],
            &paths["/jobs/{job_id}:watch"]["get"],
        ]
        .iter()
        .map(|op| &op["operationId"])
        .collect();
        assert_eq!(
            ids,
            ["SubmitJob", "ListJobs", "GetJob", "CancelJob", "WatchJob"]
        );
        assert_eq!(doc["tags"][0]["name"], "JobService");
        assert_eq!(
            doc["tags"].as_array().unwrap().len(),
            1,
            "WorkerService has no HTTP rules"
        );
    }

    #[test]
    fn openapi_job_routes_need_a_bearer_token_and_list_the_limit_answers() {
        let doc = document();
        assert_eq!(
            doc["components"]["securitySchemes"]["bearerAuth"],
            json!({
                "type": "http",
                "scheme": "bearer",
                "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
            })
        );
        let paths = doc["paths"].as_object().unwrap();
        let mut operations = 0;
        for (path, item) in paths {
            for (verb, operation) in item.as_object().unwrap() {
                operations += 1;
                let at = format!("{verb} {path}");
                assert_eq!(operation["security"], json!([{ "bearerAuth": [] }]), "{at}");
                let responses = &operation["responses"];
                for code in ["200", "401", "403", "504", "default"] {
                    assert!(responses.get(code).is_some(), "{at}: no {code}");
                }
                assert_eq!(
                    responses.get("413").is_some(),
                    operation.get("requestBody").is_some(),
                    "{at}: 413 exactly where a body is read"
                );
                let limited = matches!(
                    operation["operationId"].as_str(),
                    Some("SubmitJob" | "SubmitJobs" | "WatchJob")
                );
                assert_eq!(responses.get("429").is_some(), limited, "{at}");
                if limited {
                    assert!(
                        responses["429"]["headers"]["Retry-After"].is_object(),
                        "{at}"
                    );
                }
            }
        }
        assert_eq!(operations, 6);
        // The open routes are not part of the contract, so not listed.
        assert!(paths.get("/healthz").is_none() && paths.get("/openapi.json").is_none());
        assert!(
            doc.get("security").is_none(),
            "no document-wide requirement"
        );
    }

    #[test]
    fn openapi_submit_takes_the_whole_request_as_body() {
        let doc = document();
        let submit = &doc["paths"]["/jobs"]["post"];
        assert_eq!(
            submit["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/orchestrator.v1.SubmitJobRequest"
        );
        assert_eq!(submit["requestBody"]["required"], true);
        assert!(submit.get("parameters").is_none());
        assert_eq!(
            submit["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/orchestrator.v1.Job"
        );
        assert_eq!(
            submit["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/google.rpc.Status"
        );
        assert_eq!(
            submit["summary"],
            "Create a job and dispatch it to its queue."
        );
        assert!(
            submit["description"]
                .as_str()
                .unwrap()
                .contains("retried until it succeeds")
        );
        let request = schema(&doc, "orchestrator.v1.SubmitJobRequest");
        assert_eq!(request["properties"]["maxAttempts"]["type"], "integer");
        assert_eq!(request["properties"]["timeout"]["type"], "string");
    }

    #[test]
    fn openapi_job_schema_follows_the_json_mapping() {
        let doc = document();
        let job = schema(&doc, "orchestrator.v1.Job");
        assert_eq!(job["type"], "object");
        assert!(
            job["description"]
                .as_str()
                .unwrap()
                .starts_with("A unit of background work")
        );
        let props = &job["properties"];
        assert_eq!(props["id"]["type"], "string");
        assert_eq!(props["id"]["description"], "Server-generated UUID v4.");
        assert_eq!(props["state"]["type"], "string");
        let states: Vec<&str> = props["state"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for state in [
            "CREATED",
            "RUNNING",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "RETRYING",
        ] {
            assert!(states.contains(&state), "{state} missing from {states:?}");
        }
        assert!(
            props["state"]["description"]
                .as_str()
                .unwrap()
                .contains("- `RETRYING`: ")
        );
        assert_eq!(props["maxAttempts"]["type"], "integer");
        assert_eq!(props["createdAt"]["type"], "string");
        assert_eq!(props["createdAt"]["format"], "date-time");
        assert_eq!(props["payload"]["type"], "object");
        assert_eq!(props["labels"]["type"], "object");
        assert_eq!(props["labels"]["additionalProperties"]["type"], "string");
        assert_eq!(props["history"]["type"], "array");
        assert_eq!(
            props["history"]["items"]["$ref"],
            "#/components/schemas/orchestrator.v1.Transition"
        );
        assert_eq!(props["timeout"]["example"], "1.5s");
        assert_eq!(
            props["retry"]["allOf"][0]["$ref"],
            "#/components/schemas/orchestrator.v1.RetryPolicy"
        );
        assert!(props.get("max_attempts").is_none(), "json names only");
        assert_eq!(
            schema(&doc, "orchestrator.v1.RetryPolicy")["properties"]["multiplier"]["type"],
            "number"
        );
        for unreachable in [
            "orchestrator.v1.DispatchMessage",
            "orchestrator.v1.StartAttemptRequest",
        ] {
            assert!(
                doc["components"]["schemas"].get(unreachable).is_none(),
                "{unreachable}"
            );
        }
    }

    #[test]
    fn openapi_list_and_path_parameters() {
        let doc = document();
        let list = &doc["paths"]["/jobs"]["get"];
        let names: Vec<&str> = list["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "state",
                "kind",
                "queue",
                "pageSize",
                "pageToken",
                "namespace"
            ]
        );
        assert!(list.get("requestBody").is_none());
        let state = param(list, "state");
        assert_eq!(state["in"], "query");
        assert_eq!(state["schema"]["type"], "string");
        assert!(
            state["schema"]["enum"]
                .as_array()
                .unwrap()
                .contains(&json!("RUNNING"))
        );
        assert_eq!(param(list, "pageSize")["schema"]["type"], "integer");

        for (path, verb) in [
            ("/jobs/{job_id}", "get"),
            ("/jobs/{job_id}", "delete"),
            ("/jobs/{job_id}:watch", "get"),
        ] {
            let operation = &doc["paths"][path][verb];
            let id = param(operation, "job_id");
            assert_eq!(
                (id["in"].as_str(), id["required"].as_bool()),
                (Some("path"), Some(true))
            );
            assert_eq!(
                operation["parameters"].as_array().unwrap().len(),
                1,
                "{path} {verb}"
            );
        }
    }

    #[test]
    fn openapi_watch_is_an_ndjson_stream_of_jobs() {
        let doc = document();
        let ok = &doc["paths"]["/jobs/{job_id}:watch"]["get"]["responses"]["200"];
        let line = &ok["content"]["application/x-ndjson"]["schema"];
        assert_eq!(
            line["properties"]["result"]["$ref"],
            "#/components/schemas/orchestrator.v1.Job"
        );
        assert_eq!(
            line["properties"]["error"]["$ref"],
            "#/components/schemas/google.rpc.Status"
        );
        let status = schema(&doc, "google.rpc.Status");
        assert_eq!(status["properties"]["code"]["type"], "integer");
        assert_eq!(status["properties"]["message"]["type"], "string");
        assert_eq!(status["properties"]["details"]["type"], "array");
    }

    #[test]
    fn openapi_every_ref_resolves() {
        fn walk<'a>(value: &'a Value, refs: &mut Vec<&'a str>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        refs.push(target);
                    }
                    map.values().for_each(|v| walk(v, refs));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
                _ => {}
            }
        }
        let doc = document();
        let mut refs = Vec::new();
        walk(&doc, &mut refs);
        assert!(refs.len() > 10);
        for target in refs {
            let name = target
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {target}"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "dangling $ref {target}"
            );
        }
    }

    #[test]
    fn openapi_oneofs_are_noted() {
        let pool = DescriptorPool::decode(orchestrator::proto::FILE_DESCRIPTOR_SET).unwrap();
        let finish = pool
            .get_message_by_name("orchestrator.v1.FinishAttemptRequest")
            .unwrap();
        let mut generator = Generator::new(&pool);
        let schema = generator.message_schema(&finish);
        let completed = &schema["properties"]["completed"];
        assert_eq!(completed["type"], "object");
        let description = completed["description"].as_str().unwrap();
        assert!(description.starts_with("The handler succeeded with this result."));
        assert!(description.contains("oneof `outcome`"), "{description}");
        assert_eq!(
            schema["properties"]["failed"]["allOf"][0]["$ref"],
            "#/components/schemas/orchestrator.v1.AttemptFailure"
        );
    }

    #[test]
    fn openapi_templates_and_comments() {
        assert_eq!(
            parse_template("/v1/{name=shelves/*}/books/{book.id}:move"),
            (
                "/v1/{name}/books/{book.id}:move".to_owned(),
                vec!["name".to_owned(), "book.id".to_owned()]
            )
        );
        assert_eq!(
            clean_comment(" Line one.\n   indented\n"),
            "Line one.\n  indented"
        );
        let (summary, description) = summary_and_description("Read one job.");
        assert_eq!((summary.as_str(), description), ("Read one job.", None));
    }
}
