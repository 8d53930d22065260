/*
 * probe: one Proxy-Wasm 0.2.1 plugin that exercises every host-call family, driven by request headers,
 * so the same plugin, configuration and request can be replayed under Envoy and under wasmesh and the
 * results compared byte for byte (differential tests). See tests/plugins/README.md for the cases.
 *
 * Request header `x-probe: case1,case2,...` selects the cases. Results are recorded per stream and
 * returned as response headers `x-probe-<name>: <value>` (or in the local reply when a case sends one).
 * A status is always rendered as its decimal proxy_status_t value (0 OK, 1 NOT_FOUND, 2 BAD_ARGUMENT,
 * 7 EMPTY, 8 CAS_MISMATCH, ...), so a host that answers differently shows up in the diff.
 */
#include <stdlib.h>
#include <string.h>

#include "proxy_wasm_abi.h"

PW_IMPORT(proxy_get_status) pw_status proxy_get_status(uint32_t *code, char **message, size_t *message_size);

/* ------------------------------------------------------------------------------------------------ */
/* Small utilities: a growable string, number formatting, header-safe values.                        */

typedef struct {
  char *data;
  size_t len;
  size_t cap;
} strbuf;

static void sb_append(strbuf *sb, const char *data, size_t len) {
  if (sb->len + len + 1 > sb->cap) {
    size_t cap = sb->cap ? sb->cap : 64;
    while (cap < sb->len + len + 1) cap *= 2;
    sb->data = realloc(sb->data, cap);
    sb->cap = cap;
  }
  if (len) memcpy(sb->data + sb->len, data, len);
  sb->len += len;
  sb->data[sb->len] = '\0';
}

static void sb_str(strbuf *sb, const char *s) { sb_append(sb, s, strlen(s)); }

static void sb_u64(strbuf *sb, uint64_t v) {
  char digits[24];
  int n = 0;
  do {
    digits[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n) sb_append(sb, &digits[--n], 1);
}

static void sb_i64(strbuf *sb, int64_t v) {
  if (v < 0) {
    sb_append(sb, "-", 1);
    sb_u64(sb, (uint64_t)0 - (uint64_t)v);
  } else {
    sb_u64(sb, (uint64_t)v);
  }
}

/* Header values must be printable ASCII; anything else becomes '?' and long values are cut, so a
   binary or huge value never breaks the response we report it in. */
static void sb_header_safe(strbuf *sb, const char *data, size_t len) {
  const size_t limit = 200;
  for (size_t i = 0; i < len && i < limit; i++) {
    char c = data[i];
    if ((unsigned char)c < 0x20 || (unsigned char)c > 0x7e) c = '?';
    sb_append(sb, &c, 1);
  }
  if (len > limit) sb_str(sb, "...");
}

static void sb_free(strbuf *sb) {
  free(sb->data);
  sb->data = NULL;
  sb->len = sb->cap = 0;
}

static const char *sb_cstr(strbuf *sb) { return sb->data ? sb->data : ""; }

static uint64_t parse_u64(const char *s, size_t len) {
  uint64_t v = 0;
  for (size_t i = 0; i < len && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (uint64_t)(s[i] - '0');
  return v;
}

static uint64_t read_u64_le(const char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | (unsigned char)p[i];
  return v;
}

static void log_str(uint32_t level, const char *message) { proxy_log(level, message, strlen(message)); }

/* Finds `"key":` in a flat JSON text and returns the number after it, or `fallback`. The probe's
   configuration is tiny and machine-written, so a full JSON parser is not worth its size here. */
static uint64_t json_number(const char *json, size_t len, const char *key, uint64_t fallback) {
  size_t key_len = strlen(key);
  for (size_t i = 0; i + key_len + 2 < len; i++) {
    if (json[i] == '"' && memcmp(json + i + 1, key, key_len) == 0 && json[i + 1 + key_len] == '"') {
      size_t j = i + key_len + 2;
      while (j < len && (json[j] == ' ' || json[j] == ':')) j++;
      if (j < len && json[j] >= '0' && json[j] <= '9') return parse_u64(json + j, len - j);
      return fallback;
    }
  }
  return fallback;
}

static int contains(const char *haystack, size_t len, const char *needle) {
  size_t n = strlen(needle);
  for (size_t i = 0; i + n <= len; i++)
    if (memcmp(haystack + i, needle, n) == 0) return 1;
  return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Per-context state.                                                                                 */

typedef struct result {
  char *name;  /* without the x-probe- prefix */
  char *value;
  struct result *next;
} result;

typedef struct root_ctx {
  uint32_t id;
  char *plugin_config;
  size_t plugin_config_len;
  char *vm_config;
  size_t vm_config_len;
  struct root_ctx *next;
} root_ctx;

typedef struct stream_ctx {
  uint32_t id;
  uint32_t root_id;
  char *cases;        /* the x-probe header value, or NULL when the probe is idle for this stream */
  char *key;          /* x-probe-key: names the shared data / queue / metrics this request uses */
  result *results;
  result *results_tail;
  strbuf seen;        /* the callbacks this stream received, in order */
  int local_reply_sent;
  int results_emitted;
  char *prop_list;    /* props-phases: the x-probe-props header value (dotted paths, comma-separated) */
  strbuf prop_dump;   /* props-phases: one line per (phase, property) read so far */
  struct stream_ctx *next;
} stream_ctx;

typedef struct pending_call {
  uint32_t token;
  uint32_t stream_id;
  struct pending_call *next;
} pending_call;

static root_ctx *roots;
static stream_ctx *streams;
static pending_call *pending_calls;

static root_ctx *find_root(uint32_t id) {
  for (root_ctx *r = roots; r; r = r->next)
    if (r->id == id) return r;
  return NULL;
}

static stream_ctx *find_stream(uint32_t id) {
  for (stream_ctx *s = streams; s; s = s->next)
    if (s->id == id) return s;
  return NULL;
}

static int has_case(const stream_ctx *s, const char *name) {
  if (!s || !s->cases) return 0;
  size_t n = strlen(name);
  const char *p = s->cases;
  while (*p) {
    while (*p == ' ' || *p == ',') p++;
    const char *start = p;
    while (*p && *p != ',' && *p != ' ') p++;
    if ((size_t)(p - start) == n && memcmp(start, name, n) == 0) return 1;
  }
  return 0;
}

static void add_result(stream_ctx *s, const char *name, const char *value) {
  result *r = calloc(1, sizeof(result));
  r->name = strdup(name);
  r->value = strdup(value);
  if (s->results_tail)
    s->results_tail->next = r;
  else
    s->results = r;
  s->results_tail = r;
}

static void add_status(stream_ctx *s, const char *name, pw_status status) {
  strbuf sb = {0};
  sb_u64(&sb, status);
  add_result(s, name, sb_cstr(&sb));
  sb_free(&sb);
}

/* "<status>" or "<status>:<value>" */
static void add_status_value(stream_ctx *s, const char *name, pw_status status, const char *value, size_t len) {
  strbuf sb = {0};
  sb_u64(&sb, status);
  if (status == PW_OK) {
    sb_str(&sb, ":");
    sb_header_safe(&sb, value, len);
  }
  add_result(s, name, sb_cstr(&sb));
  sb_free(&sb);
}

static void mark_seen(stream_ctx *s, const char *what) {
  if (s->seen.len) sb_str(&s->seen, ",");
  sb_str(&s->seen, what);
}

/* ------------------------------------------------------------------------------------------------ */
/* Host-call wrappers.                                                                               */

static pw_status get_header(uint32_t map, const char *name, char **value, size_t *len) {
  *value = NULL;
  *len = 0;
  return proxy_get_header_map_value(map, name, strlen(name), value, len);
}

/* Returns a malloc'd NUL-terminated copy of a header, or NULL when absent. */
static char *header_string(uint32_t map, const char *name) {
  char *value;
  size_t len;
  if (get_header(map, name, &value, &len) != PW_OK) return NULL;
  char *copy = malloc(len + 1);
  if (len) memcpy(copy, value, len);
  copy[len] = '\0';
  free(value);
  return copy;
}

static pw_status add_header(uint32_t map, const char *name, const char *value) {
  return proxy_add_header_map_value(map, name, strlen(name), value, strlen(value));
}

static pw_status replace_header(uint32_t map, const char *name, const char *value) {
  return proxy_replace_header_map_value(map, name, strlen(name), value, strlen(value));
}

static pw_status remove_header(uint32_t map, const char *name) {
  return proxy_remove_header_map_value(map, name, strlen(name));
}

/* Reports a header map: its status, pair count, and the names (in order) of the pairs that are
   pseudo-headers or x-probe-* — the part of the map both hosts are expected to agree on. */
static void report_pairs(stream_ctx *s, uint32_t map, const char *prefix) {
  char *data = NULL;
  size_t size = 0;
  pw_status status = proxy_get_header_map_pairs(map, &data, &size);
  strbuf name = {0};
  strbuf value = {0};
  uint32_t count = 0;
  if (status == PW_OK && data && size >= 4) {
    count = pw_read_u32(data);
    const char *sizes = data + 4;
    const char *p = data + 4 + 8 * (size_t)count;
    for (uint32_t i = 0; i < count; i++) {
      uint32_t key_len = pw_read_u32(sizes + 8 * i);
      uint32_t val_len = pw_read_u32(sizes + 8 * i + 4);
      if ((key_len && p[0] == ':') || (key_len >= 7 && memcmp(p, "x-probe", 7) == 0)) {
        if (value.len) sb_str(&value, ",");
        sb_header_safe(&value, p, key_len);
      }
      p += key_len + 1 + val_len + 1;
    }
  }
  free(data);
  sb_str(&name, prefix);
  sb_str(&name, "-pairs-status");
  add_status(s, sb_cstr(&name), status);
  name.len = 0;
  sb_str(&name, prefix);
  sb_str(&name, "-pairs-count");
  strbuf n = {0};
  sb_u64(&n, count);
  add_result(s, sb_cstr(&name), sb_cstr(&n));
  name.len = 0;
  sb_str(&name, prefix);
  sb_str(&name, "-pairs-names");
  add_result(s, sb_cstr(&name), sb_cstr(&value));
  name.len = 0;
  size_t byte_size = 0;
  sb_str(&name, prefix);
  sb_str(&name, "-size-status");
  add_status(s, sb_cstr(&name), proxy_get_header_map_size(map, &byte_size));
  sb_free(&name);
  sb_free(&value);
  sb_free(&n);
}

/* Reads `name`, reports "<status>:<value>" under result `result_name`. */
static void report_header(stream_ctx *s, uint32_t map, const char *name, const char *result_name) {
  char *value;
  size_t len;
  pw_status status = get_header(map, name, &value, &len);
  add_status_value(s, result_name, status, value, len);
  free(value);
}

/* Property path "a.b.c" → "a\0b\0c". `request.headers.<name>` keeps the header name whole. */
static size_t property_path(const char *dotted, char *out) {
  size_t len = strlen(dotted);
  int dots_left = (strncmp(dotted, "request.headers.", 16) == 0) ? 2 : -1;
  for (size_t i = 0; i < len; i++) {
    if (dotted[i] == '.' && dots_left != 0) {
      out[i] = '\0';
      if (dots_left > 0) dots_left--;
    } else {
      out[i] = dotted[i];
    }
  }
  return len;
}

/* kind: 's' string, 'i' int64, 'u' uint64, 'b' bool */
static void report_property(stream_ctx *s, const char *dotted, char kind) {
  char path[128];
  size_t path_len = property_path(dotted, path);
  char *value = NULL;
  size_t len = 0;
  pw_status status = proxy_get_property(path, path_len, &value, &len);
  strbuf name = {0};
  sb_str(&name, "prop-");
  for (const char *p = dotted; *p; p++) sb_append(&name, *p == '.' || *p == '_' ? "-" : p, 1);
  strbuf rendered = {0};
  sb_u64(&rendered, status);
  if (status == PW_OK) {
    sb_str(&rendered, ":");
    if (kind == 'i' && len == 8)
      sb_i64(&rendered, (int64_t)read_u64_le(value));
    else if (kind == 'u' && len == 8)
      sb_u64(&rendered, read_u64_le(value));
    else if (kind == 'b' && len == 1)
      sb_str(&rendered, value[0] ? "true" : "false");
    else if (kind == 's')
      sb_header_safe(&rendered, value, len);
    else {
      sb_str(&rendered, "len=");
      sb_u64(&rendered, len);
    }
  }
  add_result(s, sb_cstr(&name), sb_cstr(&rendered));
  free(value);
  sb_free(&name);
  sb_free(&rendered);
}

/* Serializes the stream's results (plus x-probe-seen) as a header-pairs buffer for a local reply. */
static char *serialize_results(stream_ctx *s, const char *extra_name, const char *extra_value, size_t *out_len) {
  uint32_t count = 0;
  size_t data_len = 0;
  for (result *r = s->results; r; r = r->next) {
    count++;
    data_len += strlen("x-probe-") + strlen(r->name) + 1 + strlen(r->value) + 1;
  }
  count += 2;
  data_len += strlen("x-probe-seen") + 1 + s->seen.len + 1;
  data_len += strlen(extra_name) + 1 + strlen(extra_value) + 1;
  size_t total = 4 + 8 * (size_t)count + data_len;
  char *buf = malloc(total);
  pw_write_u32(buf, count);
  char *sizes = buf + 4;
  char *data = buf + 4 + 8 * (size_t)count;
  uint32_t i = 0;
#define PUT_PAIR(k, klen, v, vlen)             \
  do {                                         \
    pw_write_u32(sizes + 8 * i, (uint32_t)(klen)); \
    pw_write_u32(sizes + 8 * i + 4, (uint32_t)(vlen)); \
    memcpy(data, k, klen);                     \
    data += klen;                              \
    *data++ = '\0';                            \
    memcpy(data, v, vlen);                     \
    data += vlen;                              \
    *data++ = '\0';                            \
    i++;                                       \
  } while (0)
  PUT_PAIR(extra_name, strlen(extra_name), extra_value, strlen(extra_value));
  for (result *r = s->results; r; r = r->next) {
    char key[96] = "x-probe-";
    strncat(key, r->name, sizeof(key) - 9);
    PUT_PAIR(key, strlen(key), r->value, strlen(r->value));
  }
  PUT_PAIR("x-probe-seen", strlen("x-probe-seen"), sb_cstr(&s->seen), s->seen.len);
#undef PUT_PAIR
  *out_len = (size_t)(data - buf);
  return buf;
}

static void emit_results(stream_ctx *s, uint32_t map) {
  if (s->results_emitted) return;
  s->results_emitted = 1;
  for (result *r = s->results; r; r = r->next) {
    char key[96] = "x-probe-";
    strncat(key, r->name, sizeof(key) - 9);
    add_header(map, key, r->value);
  }
  add_header(map, "x-probe-seen", sb_cstr(&s->seen));
}

static void send_local_reply(stream_ctx *s, uint32_t code, int32_t grpc_status) {
  size_t headers_len = 0;
  char *headers = serialize_results(s, "x-probe-local", "yes", &headers_len);
  static const char body[] = "probe local reply\n";
  static const char details[] = "probe_local_reply";
  pw_status status = proxy_send_local_response(code, details, sizeof(details) - 1, body, sizeof(body) - 1, headers,
                                               headers_len, grpc_status);
  free(headers);
  s->local_reply_sent = 1;
  s->results_emitted = 1;
  strbuf msg = {0};
  sb_str(&msg, "probe: send_local_response status=");
  sb_u64(&msg, status);
  log_str(PW_LOG_INFO, sb_cstr(&msg));
  sb_free(&msg);
}

/* Adds `delta` to the decimal counter stored in shared data `key`, retrying on CAS mismatch. */
static void shared_counter_add(const char *key, uint64_t delta) {
  for (int attempt = 0; attempt < 16; attempt++) {
    char *value = NULL;
    size_t len = 0;
    uint32_t cas = 0;
    pw_status status = proxy_get_shared_data(key, strlen(key), &value, &len, &cas);
    uint64_t current = (status == PW_OK) ? parse_u64(value, len) : 0;
    free(value);
    strbuf sb = {0};
    sb_u64(&sb, current + delta);
    status = proxy_set_shared_data(key, strlen(key), sb.data, sb.len, status == PW_OK ? cas : 0);
    sb_free(&sb);
    if (status != PW_CAS_MISMATCH) return;
  }
}

static void report_shared_value(stream_ctx *s, const char *key, const char *result_name) {
  char *value = NULL;
  size_t len = 0;
  uint32_t cas = 0;
  pw_status status = proxy_get_shared_data(key, strlen(key), &value, &len, &cas);
  add_status_value(s, result_name, status, value, len);
  free(value);
}

/* ------------------------------------------------------------------------------------------------ */
/* Cases run from on_request_headers.                                                                 */

static void case_request_headers(stream_ctx *s) {
  report_header(s, PW_MAP_REQUEST_HEADERS, "x-probe-in", "get");
  report_header(s, PW_MAP_REQUEST_HEADERS, "x-probe-absent", "get-absent");
  report_header(s, PW_MAP_REQUEST_HEADERS, ":method", "get-method");
  report_header(s, PW_MAP_REQUEST_HEADERS, ":path", "get-path");
  add_status(s, "add", add_header(PW_MAP_REQUEST_HEADERS, "x-probe-added", "added"));
  add_status(s, "add-multi", add_header(PW_MAP_REQUEST_HEADERS, "x-probe-multi", "second"));
  add_status(s, "replace", replace_header(PW_MAP_REQUEST_HEADERS, "x-probe-replaced", "replaced"));
  add_status(s, "replace-new", replace_header(PW_MAP_REQUEST_HEADERS, "x-probe-replace-new", "new"));
  add_status(s, "remove", remove_header(PW_MAP_REQUEST_HEADERS, "x-probe-remove"));
  add_status(s, "remove-absent", remove_header(PW_MAP_REQUEST_HEADERS, "x-probe-never-sent"));
  report_header(s, PW_MAP_REQUEST_HEADERS, "x-probe-multi", "get-multi");
  report_pairs(s, PW_MAP_REQUEST_HEADERS, "req");
}

static void case_request_set_pairs(stream_ctx *s) {
  char *data = NULL;
  size_t size = 0;
  pw_status status = proxy_get_header_map_pairs(PW_MAP_REQUEST_HEADERS, &data, &size);
  add_status(s, "set-pairs-get", status);
  if (status != PW_OK || size < 4) {
    free(data);
    return;
  }
  /* Rebuild the map with every pair except x-probe-remove, plus one new pair. */
  uint32_t count = pw_read_u32(data);
  const char *sizes = data + 4;
  const char *p = data + 4 + 8 * (size_t)count;
  static const char new_key[] = "x-probe-set-pairs";
  static const char new_value[] = "yes";
  char *out = malloc(size + 8 + sizeof(new_key) + sizeof(new_value));
  char *out_data = out + 4 + 8 * ((size_t)count + 1);
  uint32_t kept = 0;
  const char **keep_ptr = malloc(sizeof(char *) * (count + 1));
  uint32_t *keep_key = malloc(sizeof(uint32_t) * (count + 1));
  uint32_t *keep_val = malloc(sizeof(uint32_t) * (count + 1));
  for (uint32_t i = 0; i < count; i++) {
    uint32_t key_len = pw_read_u32(sizes + 8 * i);
    uint32_t val_len = pw_read_u32(sizes + 8 * i + 4);
    if (!(key_len == 14 && memcmp(p, "x-probe-remove", 14) == 0)) {
      keep_ptr[kept] = p;
      keep_key[kept] = key_len;
      keep_val[kept] = val_len;
      kept++;
    }
    p += key_len + 1 + val_len + 1;
  }
  keep_ptr[kept] = NULL;
  pw_write_u32(out, kept + 1);
  out_data = out + 4 + 8 * ((size_t)kept + 1);
  char *w = out_data;
  for (uint32_t i = 0; i < kept; i++) {
    pw_write_u32(out + 4 + 8 * i, keep_key[i]);
    pw_write_u32(out + 4 + 8 * i + 4, keep_val[i]);
    memcpy(w, keep_ptr[i], keep_key[i] + 1 + keep_val[i] + 1);
    w += keep_key[i] + 1 + keep_val[i] + 1;
  }
  pw_write_u32(out + 4 + 8 * kept, sizeof(new_key) - 1);
  pw_write_u32(out + 4 + 8 * kept + 4, sizeof(new_value) - 1);
  memcpy(w, new_key, sizeof(new_key));
  w += sizeof(new_key);
  memcpy(w, new_value, sizeof(new_value));
  w += sizeof(new_value);
  add_status(s, "set-pairs", proxy_set_header_map_pairs(PW_MAP_REQUEST_HEADERS, out, (size_t)(w - out)));
  report_header(s, PW_MAP_REQUEST_HEADERS, "x-probe-set-pairs", "set-pairs-readback");
  free(out);
  free(keep_ptr);
  free(keep_key);
  free(keep_val);
  free(data);
}

static void case_properties(stream_ctx *s) {
  report_property(s, "request.path", 's');
  report_property(s, "request.url_path", 's');
  report_property(s, "request.method", 's');
  report_property(s, "request.host", 's');
  report_property(s, "request.scheme", 's');
  report_property(s, "request.protocol", 's');
  report_property(s, "request.query", 's');
  report_property(s, "request.headers.x-probe-in", 's');
  report_property(s, "source.address", 's');
  report_property(s, "source.port", 'i');
  report_property(s, "destination.address", 's');
  report_property(s, "destination.port", 'i');
  report_property(s, "connection.id", 'u');
  report_property(s, "connection.mtls", 'b');
  report_property(s, "xds.node.id", 's');
  report_property(s, "node.id", 's');
  report_property(s, "xds.cluster_name", 's');
  report_property(s, "xds.route_name", 's');
  report_property(s, "plugin_name", 's');
  report_property(s, "plugin_root_id", 's');
  report_property(s, "plugin_vm_id", 's');
  report_property(s, "probe_missing_property", 's');
  static const char set_path[] = "probe_prop";
  static const char set_value[] = "set-value";
  add_status(s, "prop-set",
             proxy_set_property(set_path, sizeof(set_path) - 1, set_value, sizeof(set_value) - 1));
  report_property(s, "probe_prop", 's');
}

/* props-phases: reads every property of `x-probe-props` (dotted paths, each '.' a path separator)
   and appends one line per property: "<phase> <path> <status> <hex of the raw value>\n". The raw
   bytes are kept whole, so the test compares the exact encoding (int64 LE, bool byte, proto, pairs)
   and not a rendering of it. */
static void dump_properties(stream_ctx *s, const char *phase) {
  static const char hex[] = "0123456789abcdef";
  if (!s->prop_list) return;
  const char *p = s->prop_list;
  while (*p) {
    while (*p == ',' || *p == ' ') p++;
    const char *start = p;
    while (*p && *p != ',' && *p != ' ') p++;
    size_t n = (size_t)(p - start);
    char path[256];
    if (n == 0 || n >= sizeof(path)) continue;
    for (size_t i = 0; i < n; i++) path[i] = start[i] == '.' ? '\0' : start[i];
    char *value = NULL;
    size_t len = 0;
    pw_status status = proxy_get_property(path, n, &value, &len);
    sb_str(&s->prop_dump, phase);
    sb_str(&s->prop_dump, " ");
    sb_append(&s->prop_dump, start, n);
    sb_str(&s->prop_dump, " ");
    sb_u64(&s->prop_dump, status);
    sb_str(&s->prop_dump, " ");
    for (size_t i = 0; status == PW_OK && i < len; i++) {
      sb_append(&s->prop_dump, &hex[((unsigned char)value[i]) >> 4], 1);
      sb_append(&s->prop_dump, &hex[((unsigned char)value[i]) & 15], 1);
    }
    sb_str(&s->prop_dump, "\n");
    free(value);
  }
}

/* After the response (on_log, on_done) the dump can only leave through shared data: a later
   `props-fetch` request with the same x-probe-key returns it. */
static void store_property_dump(stream_ctx *s) {
  if (!s->prop_list) return;
  strbuf key = {0};
  sb_str(&key, "probe-props-");
  sb_str(&key, s->key);
  proxy_set_shared_data(key.data, key.len, sb_cstr(&s->prop_dump), s->prop_dump.len, 0);
  sb_free(&key);
}

/* props-fetch: a local 200 whose body is the dump stored under this x-probe-key ("" if none). */
static void case_props_fetch(stream_ctx *s) {
  strbuf key = {0};
  sb_str(&key, "probe-props-");
  sb_str(&key, s->key);
  char *value = NULL;
  size_t len = 0;
  uint32_t cas = 0;
  if (proxy_get_shared_data(key.data, key.len, &value, &len, &cas) != PW_OK) len = 0;
  static const char details[] = "probe_props_fetch";
  proxy_send_local_response(200, details, sizeof(details) - 1, value ? value : "", len, NULL, 0, PW_NO_GRPC_STATUS);
  s->local_reply_sent = 1;
  s->results_emitted = 1;
  free(value);
  sb_free(&key);
}

static void case_shared_data(stream_ctx *s) {
  strbuf key = {0};
  sb_str(&key, "probe-shared-");
  sb_str(&key, s->key);
  char *value = NULL;
  size_t len = 0;
  uint32_t cas = 0;
  add_status(s, "shared-get-missing", proxy_get_shared_data(key.data, key.len, &value, &len, &cas));
  free(value);
  add_status(s, "shared-set", proxy_set_shared_data(key.data, key.len, "v1", 2, 0));
  value = NULL;
  pw_status status = proxy_get_shared_data(key.data, key.len, &value, &len, &cas);
  add_status_value(s, "shared-get", status, value, len);
  free(value);
  add_result(s, "shared-cas-nonzero", cas ? "yes" : "no");
  add_status(s, "shared-set-stale-cas", proxy_set_shared_data(key.data, key.len, "v2", 2, cas + 1000));
  add_status(s, "shared-set-cas", proxy_set_shared_data(key.data, key.len, "v2", 2, cas));
  value = NULL;
  status = proxy_get_shared_data(key.data, key.len, &value, &len, &cas);
  add_status_value(s, "shared-get-after", status, value, len);
  free(value);
  sb_free(&key);
}

static void case_shared_queue(stream_ctx *s) {
  strbuf name = {0};
  sb_str(&name, "probe-queue-");
  sb_str(&name, s->key);
  uint32_t token = 0;
  pw_status status = proxy_register_shared_queue(name.data, name.len, &token);
  add_status(s, "queue-register", status);
  add_result(s, "queue-token-nonzero", token ? "yes" : "no");

  /* Resolve through the VM id the host reports for this plugin. */
  char *vm_id = NULL;
  size_t vm_id_len = 0;
  static const char vm_id_path[] = "plugin_vm_id";
  proxy_get_property(vm_id_path, sizeof(vm_id_path) - 1, &vm_id, &vm_id_len);
  uint32_t resolved = 0;
  status = proxy_resolve_shared_queue(vm_id ? vm_id : "", vm_id_len, name.data, name.len, &resolved);
  add_status(s, "queue-resolve", status);
  add_result(s, "queue-resolve-same", resolved == token ? "yes" : "no");
  free(vm_id);
  uint32_t unknown = 0;
  add_status(s, "queue-resolve-missing",
             proxy_resolve_shared_queue("", 0, "probe-no-such-queue", 19, &unknown));

  char *data = NULL;
  size_t len = 0;
  add_status(s, "queue-dequeue-empty", proxy_dequeue_shared_queue(token, &data, &len));
  free(data);
  add_status(s, "queue-enqueue-a", proxy_enqueue_shared_queue(token, "a", 1));
  add_status(s, "queue-enqueue-b", proxy_enqueue_shared_queue(token, "bb", 2));
  data = NULL;
  status = proxy_dequeue_shared_queue(token, &data, &len);
  add_status_value(s, "queue-dequeue-1", status, data, len);
  free(data);
  data = NULL;
  status = proxy_dequeue_shared_queue(token, &data, &len);
  add_status_value(s, "queue-dequeue-2", status, data, len);
  free(data);
  data = NULL;
  add_status(s, "queue-dequeue-drained", proxy_dequeue_shared_queue(token, &data, &len));
  free(data);
  data = NULL;
  add_status(s, "queue-dequeue-bad-token", proxy_dequeue_shared_queue(token + 100000, &data, &len));
  free(data);
  add_status(s, "queue-enqueue-bad-token", proxy_enqueue_shared_queue(token + 100000, "x", 1));
  sb_free(&name);
}

static void define_metric_named(stream_ctx *s, uint32_t type, const char *base, uint32_t *id, const char *result_name) {
  strbuf name = {0};
  sb_str(&name, base);
  sb_str(&name, s->key);
  add_status(s, result_name, proxy_define_metric(type, name.data, name.len, id));
  sb_free(&name);
}

static void report_metric(stream_ctx *s, uint32_t id, const char *result_name) {
  uint64_t value = 0;
  pw_status status = proxy_get_metric(id, &value);
  strbuf sb = {0};
  sb_u64(&sb, status);
  if (status == PW_OK) {
    sb_str(&sb, ":");
    sb_u64(&sb, value);
  }
  add_result(s, result_name, sb_cstr(&sb));
  sb_free(&sb);
}

static void case_metrics(stream_ctx *s) {
  uint32_t counter = 0, gauge = 0, histogram = 0, again = 0, bad = 0;
  define_metric_named(s, PW_METRIC_COUNTER, "probe_counter_", &counter, "metric-define-counter");
  define_metric_named(s, PW_METRIC_GAUGE, "probe_gauge_", &gauge, "metric-define-gauge");
  define_metric_named(s, PW_METRIC_HISTOGRAM, "probe_histogram_", &histogram, "metric-define-histogram");
  define_metric_named(s, PW_METRIC_COUNTER, "probe_counter_", &again, "metric-define-again");
  add_result(s, "metric-define-same-id", again == counter ? "yes" : "no");
  define_metric_named(s, 3, "probe_bad_type_", &bad, "metric-define-bad-type");

  add_status(s, "metric-counter-inc", proxy_increment_metric(counter, 3));
  add_status(s, "metric-counter-inc-negative", proxy_increment_metric(counter, -1));
  add_status(s, "metric-counter-record", proxy_record_metric(counter, 2));
  report_metric(s, counter, "metric-counter");

  add_status(s, "metric-gauge-record", proxy_record_metric(gauge, 10));
  add_status(s, "metric-gauge-inc", proxy_increment_metric(gauge, 5));
  add_status(s, "metric-gauge-dec", proxy_increment_metric(gauge, -3));
  report_metric(s, gauge, "metric-gauge");

  add_status(s, "metric-histogram-record", proxy_record_metric(histogram, 42));
  add_status(s, "metric-histogram-inc", proxy_increment_metric(histogram, 1));
  report_metric(s, histogram, "metric-histogram");

  report_metric(s, 0x7fffff0u, "metric-unknown");
}

static void case_log(stream_ctx *s) {
  static const char *const messages[] = {"probe log trace", "probe log debug", "probe log info",
                                         "probe log warn", "probe log error", "probe log critical"};
  strbuf statuses = {0};
  for (uint32_t level = 0; level <= 6; level++) {
    const char *message = level <= 5 ? messages[level] : "probe log bad level";
    if (statuses.len) sb_str(&statuses, ",");
    sb_u64(&statuses, proxy_log(level, message, strlen(message)));
  }
  add_result(s, "log-statuses", sb_cstr(&statuses));
  sb_free(&statuses);
  uint32_t level = 99;
  pw_status status = proxy_get_log_level(&level);
  strbuf sb = {0};
  sb_u64(&sb, status);
  if (status == PW_OK) {
    sb_str(&sb, ":");
    sb_u64(&sb, level);
  }
  add_result(s, "log-level", sb_cstr(&sb));
  sb_free(&sb);
}

static void case_time(stream_ctx *s) {
  uint64_t now = 0;
  pw_status status = proxy_get_current_time_nanoseconds(&now);
  /* 2020-01-01 in ns: anything earlier means the host wrote a truncated or wrong-unit value. */
  const uint64_t year_2020_ns = 1577836800ull * 1000000000ull;
  add_result(s, "time", status != PW_OK ? "error" : (now > year_2020_ns ? "0:plausible" : "0:implausible"));
}

static void case_foreign(stream_ctx *s) {
  static const char name[] = "probe_no_such_function";
  char *out = NULL;
  size_t out_len = 0;
  add_status(s, "foreign-unknown", proxy_call_foreign_function(name, sizeof(name) - 1, "x", 1, &out, &out_len));
  free(out);
}

static void case_config(stream_ctx *s) {
  root_ctx *root = find_root(s->root_id);
  strbuf sb = {0};
  if (root && root->plugin_config) sb_header_safe(&sb, root->plugin_config, root->plugin_config_len);
  add_result(s, "config", sb_cstr(&sb));
  sb_free(&sb);
  if (root && root->vm_config) sb_header_safe(&sb, root->vm_config, root->vm_config_len);
  add_result(s, "vm-config", sb_cstr(&sb));
  sb_free(&sb);
  /* The configuration buffers exist only during on_vm_start/on_configure. */
  char *late = NULL;
  size_t late_len = 0;
  add_status(s, "config-late",
             proxy_get_buffer_bytes(PW_BUFFER_PLUGIN_CONFIGURATION, 0, 0xffffffffu, &late, &late_len));
  free(late);
}

static void case_misc(stream_ctx *s) {
  char *value = NULL;
  size_t len = 0;
  add_status(s, "misc-bad-map", proxy_get_header_map_value(99, "a", 1, &value, &len));
  free(value);
  value = NULL;
  add_status(s, "misc-bad-buffer", proxy_get_buffer_bytes(99, 0, 10, &value, &len));
  free(value);
  add_status(s, "misc-bad-effective-context", proxy_set_effective_context(0x7ffffff0u));
  add_status(s, "misc-continue-bad-stream", proxy_continue_stream(99));
  uint32_t metric_id = 0;
  add_status(s, "misc-bad-metric-type", proxy_define_metric(7, "x", 1, &metric_id));
}

static void case_ticks(stream_ctx *s) { report_shared_value(s, "probe-ticks", "ticks"); }

/* Returns 1 when the request is paused waiting for the call's answer. */
static int case_http_call(stream_ctx *s) {
  char *cluster = header_string(PW_MAP_REQUEST_HEADERS, "x-probe-cluster");
  char *path = header_string(PW_MAP_REQUEST_HEADERS, "x-probe-call-path");
  const char *authority = "probe-call";
  const char *call_path = path ? path : "/probe-call";
  /* Pairs: :method GET, :path <path>, :authority probe-call, x-probe-call 1 */
  const char *keys[] = {":method", ":path", ":authority", "x-probe-call"};
  const char *values[] = {"GET", call_path, authority, "1"};
  size_t total = 4 + 8 * 4;
  for (int i = 0; i < 4; i++) total += strlen(keys[i]) + 1 + strlen(values[i]) + 1;
  char *headers = malloc(total);
  pw_write_u32(headers, 4);
  char *w = headers + 4 + 8 * 4;
  for (int i = 0; i < 4; i++) {
    size_t kl = strlen(keys[i]), vl = strlen(values[i]);
    pw_write_u32(headers + 4 + 8 * i, (uint32_t)kl);
    pw_write_u32(headers + 4 + 8 * i + 4, (uint32_t)vl);
    memcpy(w, keys[i], kl + 1);
    w += kl + 1;
    memcpy(w, values[i], vl + 1);
    w += vl + 1;
  }
  const char *upstream = cluster ? cluster : "probe_missing_cluster";
  uint32_t token = 0;
  pw_status status =
      proxy_http_call(upstream, strlen(upstream), headers, total, "", 0, NULL, 0, 5000, &token);
  add_status(s, "call-dispatch", status);
  free(headers);
  free(cluster);
  free(path);
  if (status != PW_OK) return 0;
  pending_call *call = calloc(1, sizeof(pending_call));
  call->token = token;
  call->stream_id = s->id;
  call->next = pending_calls;
  pending_calls = call;
  return 1;
}

/* ------------------------------------------------------------------------------------------------ */
/* Bodies: buffer until end of stream, then read and edit the whole body.                            */

static int wants_body(const stream_ctx *s, const char *side) {
  static const char *const ops[] = {"read", "append", "prepend", "replace"};
  for (int i = 0; i < 4; i++) {
    char name[32] = {0};
    strcpy(name, side);
    strcat(name, "-body-");
    strcat(name, ops[i]);
    if (has_case(s, name)) return 1;
  }
  return 0;
}

static int edits_body(const stream_ctx *s, const char *side) {
  static const char *const ops[] = {"append", "prepend", "replace"};
  for (int i = 0; i < 3; i++) {
    char name[32] = {0};
    strcpy(name, side);
    strcat(name, "-body-");
    strcat(name, ops[i]);
    if (has_case(s, name)) return 1;
  }
  return 0;
}

static void body_at_end(stream_ctx *s, uint32_t buffer, const char *side, uint32_t body_size) {
  char name[40];
  char *data = NULL;
  size_t len = 0;
  pw_status status = proxy_get_buffer_bytes(buffer, 0, body_size, &data, &len);
  strcpy(name, side);
  strcat(name, "-body");
  add_status_value(s, name, status, data, len);
  free(data);
  size_t status_len = 0;
  uint32_t flags = 0;
  status = proxy_get_buffer_status(buffer, &status_len, &flags);
  strbuf sb = {0};
  sb_u64(&sb, status);
  sb_str(&sb, ":");
  sb_u64(&sb, status_len);
  strcpy(name, side);
  strcat(name, "-body-length");
  add_result(s, name, sb_cstr(&sb));
  sb_free(&sb);
  data = NULL;
  status = proxy_get_buffer_bytes(buffer, 1, 3, &data, &len);
  strcpy(name, side);
  strcat(name, "-body-slice");
  add_status_value(s, name, status, data, len);
  free(data);

  char case_name[40];
  strcpy(case_name, side);
  strcat(case_name, "-body-append");
  if (has_case(s, case_name)) {
    static const char text[] = "[probe-append]";
    strcpy(name, side);
    strcat(name, "-body-append");
    add_status(s, name, proxy_set_buffer_bytes(buffer, body_size, 0, text, sizeof(text) - 1));
  }
  strcpy(case_name, side);
  strcat(case_name, "-body-prepend");
  if (has_case(s, case_name)) {
    static const char text[] = "[probe-prepend]";
    strcpy(name, side);
    strcat(name, "-body-prepend");
    add_status(s, name, proxy_set_buffer_bytes(buffer, 0, 0, text, sizeof(text) - 1));
  }
  strcpy(case_name, side);
  strcat(case_name, "-body-replace");
  if (has_case(s, case_name)) {
    static const char text[] = "[probe-replace]";
    strcpy(name, side);
    strcat(name, "-body-replace");
    add_status(s, name, proxy_set_buffer_bytes(buffer, 0, body_size, text, sizeof(text) - 1));
  }
}

/* ------------------------------------------------------------------------------------------------ */
/* Exports: allocator and ABI marker.                                                                */

PW_EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}

PW_EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) { return malloc(size); }
/* libc's `malloc` is exported too (linker flag --export=malloc): Envoy looks it up first. */

/* ------------------------------------------------------------------------------------------------ */
/* Root-context callbacks.                                                                          */

PW_EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t context_id, uint32_t parent_id) {
  if (parent_id == 0) {
    root_ctx *root = calloc(1, sizeof(root_ctx));
    root->id = context_id;
    root->next = roots;
    roots = root;
    return;
  }
  stream_ctx *s = calloc(1, sizeof(stream_ctx));
  s->id = context_id;
  s->root_id = parent_id;
  s->next = streams;
  streams = s;
  mark_seen(s, "create");
}

PW_EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_id, uint32_t vm_config_size) {
  root_ctx *root = find_root(root_id);
  char *data = NULL;
  size_t len = 0;
  if (vm_config_size && proxy_get_buffer_bytes(PW_BUFFER_VM_CONFIGURATION, 0, vm_config_size, &data, &len) == PW_OK &&
      root) {
    root->vm_config = data;
    root->vm_config_len = len;
  } else {
    free(data);
  }
  log_str(PW_LOG_INFO, "probe: on_vm_start");
  return (root && contains(root->vm_config ? root->vm_config : "", root->vm_config_len, "fail_vm_start")) ? 0 : 1;
}

PW_EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_id, uint32_t config_size) {
  root_ctx *root = find_root(root_id);
  if (!root) return 0;
  free(root->plugin_config);
  root->plugin_config = NULL;
  root->plugin_config_len = 0;
  char *data = NULL;
  size_t len = 0;
  if (config_size &&
      proxy_get_buffer_bytes(PW_BUFFER_PLUGIN_CONFIGURATION, 0, config_size, &data, &len) == PW_OK) {
    root->plugin_config = data;
    root->plugin_config_len = len;
  } else {
    free(data);
  }
  strbuf msg = {0};
  sb_str(&msg, "probe: on_configure config=");
  sb_header_safe(&msg, root->plugin_config ? root->plugin_config : "", root->plugin_config_len);
  log_str(PW_LOG_INFO, sb_cstr(&msg));
  sb_free(&msg);
  if (contains(root->plugin_config ? root->plugin_config : "", root->plugin_config_len, "fail_configure")) {
    log_str(PW_LOG_WARN, "probe: refusing configuration (fail_configure)");
    return 0;
  }
  uint64_t tick_ms = json_number(root->plugin_config ? root->plugin_config : "", root->plugin_config_len, "tick_ms", 0);
  if (tick_ms) proxy_set_tick_period_milliseconds((uint32_t)tick_ms);
  return 1;
}

PW_EXPORT(proxy_on_tick) void proxy_on_tick(uint32_t root_id) {
  (void)root_id;
  shared_counter_add("probe-ticks", 1);
}

PW_EXPORT(proxy_on_queue_ready) void proxy_on_queue_ready(uint32_t root_id, uint32_t token) {
  (void)root_id;
  (void)token;
  shared_counter_add("probe-queue-ready", 1);
}

PW_EXPORT(proxy_on_http_call_response)
void proxy_on_http_call_response(uint32_t root_id, uint32_t token, uint32_t num_headers, uint32_t body_size,
                                 uint32_t num_trailers) {
  (void)root_id;
  pending_call **link = &pending_calls;
  while (*link && (*link)->token != token) link = &(*link)->next;
  if (!*link) {
    log_str(PW_LOG_WARN, "probe: http call response for an unknown token");
    return;
  }
  pending_call *call = *link;
  *link = call->next;
  stream_ctx *s = find_stream(call->stream_id);
  free(call);
  if (!s) return;
  add_status(s, "call-effective-context", proxy_set_effective_context(s->id));
  (void)num_trailers;
  add_result(s, "call-has-headers", num_headers ? "yes" : "no");
  if (num_headers == 0) {
    uint32_t code = 0;
    char *message = NULL;
    size_t message_len = 0;
    pw_status status = proxy_get_status(&code, &message, &message_len);
    strbuf failure = {0};
    sb_u64(&failure, status);
    sb_str(&failure, ":");
    sb_u64(&failure, code);
    add_result(s, "call-failure", sb_cstr(&failure));
    sb_free(&failure);
    free(message);
  } else {
    report_header(s, PW_MAP_HTTP_CALL_RESPONSE_HEADERS, ":status", "call-status");
    report_header(s, PW_MAP_HTTP_CALL_RESPONSE_HEADERS, "x-probe-call-reply", "call-reply-header");
    char *body = NULL;
    size_t len = 0;
    pw_status status = proxy_get_buffer_bytes(PW_BUFFER_HTTP_CALL_RESPONSE_BODY, 0, body_size, &body, &len);
    add_status_value(s, "call-body", status, body, len);
    free(body);
    /* Hand the answer to the upstream through the original request. */
    char *call_status = header_string(PW_MAP_HTTP_CALL_RESPONSE_HEADERS, ":status");
    add_status(s, "call-annotate",
               add_header(PW_MAP_REQUEST_HEADERS, "x-probe-call-status", call_status ? call_status : "none"));
    free(call_status);
  }
  mark_seen(s, "call-response");
  add_status(s, "call-continue", proxy_continue_stream(PW_STREAM_REQUEST));
}

/* ------------------------------------------------------------------------------------------------ */
/* Stream callbacks.                                                                                */

PW_EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)num_headers;
  stream_ctx *s = find_stream(context_id);
  if (!s) return PW_HEADERS_CONTINUE;
  mark_seen(s, end_of_stream ? "reqh:eos" : "reqh");
  s->cases = header_string(PW_MAP_REQUEST_HEADERS, "x-probe");
  if (!s->cases) return PW_HEADERS_CONTINUE;
  s->key = header_string(PW_MAP_REQUEST_HEADERS, "x-probe-key");
  if (!s->key) s->key = strdup("default");

  if (has_case(s, "req-headers")) case_request_headers(s);
  if (has_case(s, "req-set-pairs")) case_request_set_pairs(s);
  if (has_case(s, "props")) case_properties(s);
  if (has_case(s, "props-phases")) {
    s->prop_list = header_string(PW_MAP_REQUEST_HEADERS, "x-probe-props");
    dump_properties(s, "reqh");
  }
  if (has_case(s, "props-fetch")) {
    case_props_fetch(s);
    return PW_HEADERS_CONTINUE;
  }
  if (has_case(s, "shared")) case_shared_data(s);
  if (has_case(s, "queue")) case_shared_queue(s);
  if (has_case(s, "metrics")) case_metrics(s);
  if (has_case(s, "log")) case_log(s);
  if (has_case(s, "time")) case_time(s);
  if (has_case(s, "foreign")) case_foreign(s);
  if (has_case(s, "config")) case_config(s);
  if (has_case(s, "misc")) case_misc(s);
  if (has_case(s, "ticks")) case_ticks(s);
  if (has_case(s, "queue-ready")) report_shared_value(s, "probe-queue-ready", "queue-ready");
  /* An edited body no longer matches the client's content-length. */
  if (edits_body(s, "req")) add_status(s, "req-drop-content-length", remove_header(PW_MAP_REQUEST_HEADERS, "content-length"));

  if (has_case(s, "local")) {
    char *code = header_string(PW_MAP_REQUEST_HEADERS, "x-probe-local-status");
    send_local_reply(s, code ? (uint32_t)parse_u64(code, strlen(code)) : 403, PW_NO_GRPC_STATUS);
    free(code);
    /* Hosts ignore the callback's result after a local reply; return Continue to prove it. */
    return PW_HEADERS_CONTINUE;
  }
  if (has_case(s, "local-grpc")) {
    char *grpc = header_string(PW_MAP_REQUEST_HEADERS, "x-probe-grpc-status");
    send_local_reply(s, 403, grpc ? (int32_t)parse_u64(grpc, strlen(grpc)) : 7);
    free(grpc);
    return PW_HEADERS_CONTINUE;
  }
  if (has_case(s, "close")) {
    add_status(s, "close", proxy_close_stream(PW_STREAM_REQUEST));
    return PW_HEADERS_STOP_ITERATION;
  }
  if (has_case(s, "http-call") && case_http_call(s)) return PW_HEADERS_STOP_ITERATION;
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_request_body)
uint32_t proxy_on_request_body(uint32_t context_id, uint32_t body_size, uint32_t end_of_stream) {
  stream_ctx *s = find_stream(context_id);
  if (!s) return PW_DATA_CONTINUE;
  if (end_of_stream) mark_seen(s, "reqb:eos");
  if (end_of_stream) dump_properties(s, "reqb");
  if (!wants_body(s, "req")) return PW_DATA_CONTINUE;
  if (!end_of_stream) return PW_DATA_STOP_ITERATION_AND_BUFFER;
  body_at_end(s, PW_BUFFER_REQUEST_BODY, "req", body_size);
  return PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_on_request_trailers) uint32_t proxy_on_request_trailers(uint32_t context_id, uint32_t num_trailers) {
  (void)num_trailers;
  stream_ctx *s = find_stream(context_id);
  if (!s) return PW_TRAILERS_CONTINUE;
  mark_seen(s, "reqt");
  dump_properties(s, "reqt");
  if (has_case(s, "req-trailers")) {
    report_header(s, PW_MAP_REQUEST_TRAILERS, "x-trailer-in", "req-trailer-get");
    add_status(s, "req-trailer-add", add_header(PW_MAP_REQUEST_TRAILERS, "x-probe-trailer-added", "added"));
    report_pairs(s, PW_MAP_REQUEST_TRAILERS, "req-trailers");
  }
  return PW_TRAILERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers)
uint32_t proxy_on_response_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)num_headers;
  stream_ctx *s = find_stream(context_id);
  if (!s) return PW_HEADERS_CONTINUE;
  mark_seen(s, end_of_stream ? "resph:eos" : "resph");
  dump_properties(s, "resph");
  if (!s->cases || s->local_reply_sent) return PW_HEADERS_CONTINUE;
  if (has_case(s, "resp-headers")) {
    report_header(s, PW_MAP_RESPONSE_HEADERS, ":status", "resp-get-status");
    report_header(s, PW_MAP_RESPONSE_HEADERS, "x-probe-resp-in", "resp-get");
    report_header(s, PW_MAP_RESPONSE_HEADERS, "x-probe-absent", "resp-get-absent");
    add_status(s, "resp-add", add_header(PW_MAP_RESPONSE_HEADERS, "x-probe-resp-added", "added"));
    add_status(s, "resp-replace", replace_header(PW_MAP_RESPONSE_HEADERS, "x-probe-resp-replaced", "replaced"));
    add_status(s, "resp-removed", remove_header(PW_MAP_RESPONSE_HEADERS, "x-probe-resp-remove"));
    report_pairs(s, PW_MAP_RESPONSE_HEADERS, "resp");
  }
  if (has_case(s, "props")) {
    report_property(s, "response.code", 'i');
    report_property(s, "response.code_details", 's');
  }
  if (edits_body(s, "resp"))
    add_status(s, "resp-drop-content-length", remove_header(PW_MAP_RESPONSE_HEADERS, "content-length"));
  if (has_case(s, "resp-local")) {
    send_local_reply(s, 418, PW_NO_GRPC_STATUS);
    return PW_HEADERS_CONTINUE;
  }
  emit_results(s, PW_MAP_RESPONSE_HEADERS);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_body)
uint32_t proxy_on_response_body(uint32_t context_id, uint32_t body_size, uint32_t end_of_stream) {
  stream_ctx *s = find_stream(context_id);
  if (!s) return PW_DATA_CONTINUE;
  if (end_of_stream) mark_seen(s, "respb:eos");
  if (end_of_stream) dump_properties(s, "respb");
  if (!wants_body(s, "resp") || s->local_reply_sent) return PW_DATA_CONTINUE;
  if (!end_of_stream) return PW_DATA_STOP_ITERATION_AND_BUFFER;
  /* Response headers are already gone; report the body results by editing the body itself. */
  body_at_end(s, PW_BUFFER_RESPONSE_BODY, "resp", body_size);
  return PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_on_response_trailers) uint32_t proxy_on_response_trailers(uint32_t context_id, uint32_t num_trailers) {
  (void)num_trailers;
  stream_ctx *s = find_stream(context_id);
  if (!s) return PW_TRAILERS_CONTINUE;
  mark_seen(s, "respt");
  dump_properties(s, "respt");
  if (has_case(s, "resp-trailers")) {
    char *value = NULL;
    size_t len = 0;
    pw_status status = get_header(PW_MAP_RESPONSE_TRAILERS, "x-trailer-in", &value, &len);
    strbuf sb = {0};
    sb_u64(&sb, status);
    if (status == PW_OK) {
      sb_str(&sb, ":");
      sb_header_safe(&sb, value, len);
    }
    free(value);
    add_header(PW_MAP_RESPONSE_TRAILERS, "x-probe-resp-trailer-get", sb_cstr(&sb));
    add_header(PW_MAP_RESPONSE_TRAILERS, "x-probe-resp-trailer-added", "added");
    sb_free(&sb);
  }
  return PW_TRAILERS_CONTINUE;
}

PW_EXPORT(proxy_on_log) void proxy_on_log(uint32_t context_id) {
  stream_ctx *s = find_stream(context_id);
  if (!s) return;
  mark_seen(s, "log");
  if (!s->cases) return;
  dump_properties(s, "log");
  store_property_dump(s);
  strbuf msg = {0};
  sb_str(&msg, "probe: on_log cases=");
  sb_str(&msg, s->cases);
  sb_str(&msg, " seen=");
  sb_str(&msg, sb_cstr(&s->seen));
  log_str(PW_LOG_INFO, sb_cstr(&msg));
  sb_free(&msg);
}

PW_EXPORT(proxy_on_done) uint32_t proxy_on_done(uint32_t context_id) {
  stream_ctx *s = find_stream(context_id);
  if (s) {
    mark_seen(s, "done");
    dump_properties(s, "done");
    store_property_dump(s);
  }
  return 1;
}

PW_EXPORT(proxy_on_delete) void proxy_on_delete(uint32_t context_id) {
  stream_ctx **link = &streams;
  while (*link && (*link)->id != context_id) link = &(*link)->next;
  if (*link) {
    stream_ctx *s = *link;
    *link = s->next;
    for (result *r = s->results; r;) {
      result *next = r->next;
      free(r->name);
      free(r->value);
      free(r);
      r = next;
    }
    free(s->cases);
    free(s->key);
    free(s->prop_list);
    sb_free(&s->prop_dump);
    sb_free(&s->seen);
    free(s);
    return;
  }
  root_ctx **root_link = &roots;
  while (*root_link && (*root_link)->id != context_id) root_link = &(*root_link)->next;
  if (*root_link) {
    root_ctx *root = *root_link;
    *root_link = root->next;
    free(root->plugin_config);
    free(root->vm_config);
    free(root);
  }
}
