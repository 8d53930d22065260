/*
 * rate-limit: a token bucket shared by every stream (and every VM) of the plugin. Requests over the
 * limit get a local 429 with the configured headers; every response gets a who-am-i header.
 *
 * pluginConfig (all optional):
 *   requests_per_second  tokens added per second (default 2, > 0 and <= 10000)
 *   burst                bucket capacity (default: requests_per_second rounded up, >= 1)
 *   limited_status       status of the rejection (default 429)
 *   limited_headers      headers added to the rejection (default {"powered-by": "proxy-wasm"})
 *   who_am_i_header      name of the identity header (default "who-am-i")
 *   who_am_i             its value (default: the proxy's node id, else the plugin name)
 *   bucket_key           shared-data key holding the bucket (default "rate-limit.bucket")
 */
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "plugin_util.h"
#include "proxy_wasm_abi.h"

#define NS_PER_SECOND 1000000000ull
#define MILLI 1000ull

typedef struct {
  uint64_t rate_milli;     /* tokens per second × 1000 */
  uint64_t capacity_milli; /* bucket size × 1000 */
  uint32_t limited_status;
  header_list limited_headers;
  char *who_am_i_header;
  char *who_am_i;
  char *bucket_key;
  json *document; /* owns the strings limited_headers points into */
} settings;

static settings config;

static void settings_clear(settings *s) {
  json_free(s->document);
  free(s->who_am_i_header);
  free(s->who_am_i);
  free(s->bucket_key);
  memset(s, 0, sizeof(*s));
}

static int fail(const char *message) {
  log_pair(PW_LOG_ERROR, "rate-limit: invalid pluginConfig: ", message);
  return 0;
}

/* The identity used when who_am_i is not configured: the node id, else the plugin name. */
static char *default_identity(void) {
  /* Property paths are NUL-separated segments. */
  static const char *const joined[] = {"xds\0node\0id", "node\0id", "plugin_name"};
  static const size_t lengths[] = {sizeof("xds\0node\0id") - 1, sizeof("node\0id") - 1, sizeof("plugin_name") - 1};
  for (int i = 0; i < 3; i++) {
    char *value = NULL;
    size_t len = 0;
    if (proxy_get_property(joined[i], lengths[i], &value, &len) == PW_OK && len > 0) {
      char *text = malloc(len + 1);
      memcpy(text, value, len);
      text[len] = '\0';
      free(value);
      return text;
    }
    free(value);
  }
  return copy_string("wasmesh");
}

PW_EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}
PW_EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) { return malloc(size); }
PW_EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t context_id, uint32_t parent_id) {
  (void)context_id;
  (void)parent_id;
}
PW_EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_id, uint32_t size) {
  (void)root_id;
  (void)size;
  return 1;
}

PW_EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_id, uint32_t size) {
  (void)root_id;
  char *text = read_plugin_configuration(size);
  char error[160];
  json *document = json_parse(text, strlen(text), error, sizeof(error));
  free(text);
  if (!document) return (uint32_t)fail(error);
  if (document->kind != JSON_OBJECT) {
    json_free(document);
    return (uint32_t)fail("must be a JSON object");
  }
  settings next = {0};
  next.document = document;
  double rate = 2;
  json *field = json_get(document, "requests_per_second");
  if (field) {
    if (field->kind != JSON_NUMBER || field->number <= 0 || field->number > 10000) {
      settings_clear(&next);
      return (uint32_t)fail("requests_per_second must be a number in (0, 10000]");
    }
    rate = field->number;
  }
  next.rate_milli = (uint64_t)(rate * MILLI + 0.5);
  if (next.rate_milli == 0) next.rate_milli = 1;
  double burst = (double)((uint64_t)rate + (rate > (double)(uint64_t)rate ? 1 : 0));
  field = json_get(document, "burst");
  if (field) {
    if (field->kind != JSON_NUMBER || field->number < 1 || field->number > 1000000) {
      settings_clear(&next);
      return (uint32_t)fail("burst must be a number in [1, 1000000]");
    }
    burst = field->number;
  }
  next.capacity_milli = (uint64_t)(burst * MILLI + 0.5);
  next.limited_status = 429;
  field = json_get(document, "limited_status");
  if (field) {
    if (field->kind != JSON_NUMBER || field->number < 200 || field->number > 599) {
      settings_clear(&next);
      return (uint32_t)fail("limited_status must be an HTTP status in [200, 599]");
    }
    next.limited_status = (uint32_t)field->number;
  }
  field = json_get(document, "limited_headers");
  if (field) {
    if (field->kind != JSON_OBJECT) {
      settings_clear(&next);
      return (uint32_t)fail("limited_headers must be an object of header name to string value");
    }
    for (json *header = field->child; header; header = header->next) {
      if (header->kind != JSON_STRING || !header->key[0]) {
        settings_clear(&next);
        return (uint32_t)fail("limited_headers values must be strings");
      }
      if (next.limited_headers.count == 6) {
        settings_clear(&next);
        return (uint32_t)fail("limited_headers accepts at most 6 headers");
      }
      to_lower_ascii(header->key);
      header_list_add(&next.limited_headers, header->key, header->string);
    }
  } else {
    header_list_add(&next.limited_headers, "powered-by", "proxy-wasm");
  }
  const char *const string_fields[] = {"who_am_i_header", "who_am_i", "bucket_key"};
  char **const targets[] = {&next.who_am_i_header, &next.who_am_i, &next.bucket_key};
  for (int i = 0; i < 3; i++) {
    field = json_get(document, string_fields[i]);
    if (!field) continue;
    if (field->kind != JSON_STRING || field->string_len == 0) {
      settings_clear(&next);
      log_pair(PW_LOG_ERROR, "rate-limit: invalid pluginConfig: must be a non-empty string: ", string_fields[i]);
      return 0;
    }
    *targets[i] = copy_string(field->string);
  }
  if (!next.who_am_i_header) next.who_am_i_header = copy_string("who-am-i");
  to_lower_ascii(next.who_am_i_header);
  if (!next.who_am_i) next.who_am_i = default_identity();
  if (!next.bucket_key) next.bucket_key = copy_string("rate-limit.bucket");
  settings_clear(&config);
  config = next;
  log_pair(PW_LOG_INFO, "rate-limit: configured, identity ", config.who_am_i);
  return 1;
}

static uint64_t parse_u64(const char **cursor) {
  uint64_t value = 0;
  while (**cursor >= '0' && **cursor <= '9') value = value * 10 + (uint64_t)(*(*cursor)++ - '0');
  return value;
}

static size_t format_u64(char *out, uint64_t value) {
  char digits[24];
  size_t n = 0, i = 0;
  do {
    digits[n++] = (char)('0' + value % 10);
    value /= 10;
  } while (value);
  while (n) out[i++] = digits[--n];
  return i;
}

/* Takes one token from the shared bucket; returns 1 when the request may pass. The bucket is stored
   as "<milli-tokens> <last refill ns>" and updated with compare-and-swap so concurrent VMs agree. */
static int take_token(void) {
  uint64_t now = 0;
  proxy_get_current_time_nanoseconds(&now);
  const char *key = config.bucket_key;
  for (int attempt = 0; attempt < 32; attempt++) {
    char *stored = NULL;
    size_t stored_len = 0;
    uint32_t cas = 0;
    uint64_t tokens = config.capacity_milli, last = now;
    if (proxy_get_shared_data(key, strlen(key), &stored, &stored_len, &cas) == PW_OK && stored_len) {
      char text[64] = {0};
      memcpy(text, stored, stored_len < sizeof(text) - 1 ? stored_len : sizeof(text) - 1);
      const char *cursor = text;
      tokens = parse_u64(&cursor);
      if (*cursor == ' ') cursor++;
      last = parse_u64(&cursor);
    } else {
      cas = 0;
    }
    free(stored);
    if (now > last) {
      uint64_t elapsed = now - last;
      /* Past a long idle period the bucket is simply full; this also keeps the product below 2^64. */
      if (elapsed >= 1000 * NS_PER_SECOND)
        tokens = config.capacity_milli;
      else
        tokens += elapsed * config.rate_milli / NS_PER_SECOND;
      if (tokens > config.capacity_milli) tokens = config.capacity_milli;
      last = now;
    }
    int allowed = tokens >= MILLI;
    if (allowed) tokens -= MILLI;
    char text[64];
    size_t n = format_u64(text, tokens);
    text[n++] = ' ';
    n += format_u64(text + n, last);
    pw_status status = proxy_set_shared_data(key, strlen(key), text, n, cas);
    if (status == PW_CAS_MISMATCH) continue;
    return allowed;
  }
  /* Heavy contention: fail open rather than reject traffic we could not account for. */
  return 1;
}

PW_EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)context_id;
  (void)num_headers;
  (void)end_of_stream;
  if (!config.bucket_key || take_token()) return PW_HEADERS_CONTINUE;
  header_list headers = config.limited_headers;
  header_list_add(&headers, config.who_am_i_header, config.who_am_i);
  send_local_reply(config.limited_status, "rate_limited", "Too many requests\n", &headers);
  return PW_HEADERS_STOP_ITERATION;
}

PW_EXPORT(proxy_on_response_headers)
uint32_t proxy_on_response_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)context_id;
  (void)num_headers;
  (void)end_of_stream;
  /* Replace, not add: a local reply of ours already carries the header and may pass through here. */
  if (config.who_am_i_header) set_header(PW_MAP_RESPONSE_HEADERS, config.who_am_i_header, config.who_am_i);
  return PW_HEADERS_CONTINUE;
}
