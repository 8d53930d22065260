/*
 * basic-auth: Istio's basic_auth semantics (istio-ecosystem/wasm-extensions basic_auth README).
 *
 * pluginConfig:
 *   basic_auth_rules: [ { prefix|exact|suffix: "/path",          exactly one, matched against :path
 *                         request_methods: ["GET", "POST"],      at least one
 *                         credentials: ["user:pass", "base64"] } ] at least one; "user:pass" is
 *                                                                 base64-encoded, others must be base64
 *   realm: "istio"                                                optional
 * A request whose method and path match a rule must carry `Authorization: Basic <credential>` with
 * one of that rule's credentials, or it gets 401 with `WWW-Authenticate: Basic realm=<realm>`.
 * Requests no rule matches pass untouched.
 */
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "plugin_util.h"
#include "proxy_wasm_abi.h"

typedef enum { MATCH_PREFIX, MATCH_EXACT, MATCH_SUFFIX } match_kind;

typedef struct rule {
  match_kind kind;
  char *path;
  char **methods;
  size_t method_count;
  char **credentials; /* base64 form, compared with what follows "Basic " */
  size_t credential_count;
  struct rule *next;
} rule;

static rule *rules;
static char *realm;

static void free_rules(rule *r) {
  while (r) {
    rule *next = r->next;
    free(r->path);
    for (size_t i = 0; i < r->method_count; i++) free(r->methods[i]);
    for (size_t i = 0; i < r->credential_count; i++) free(r->credentials[i]);
    free(r->methods);
    free(r->credentials);
    free(r);
    r = next;
  }
}

static const char BASE64_ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *base64_encode(const char *data, size_t len) {
  char *out = malloc(4 * ((len + 2) / 3) + 1);
  size_t n = 0;
  for (size_t i = 0; i < len; i += 3) {
    uint32_t chunk = (uint32_t)(unsigned char)data[i] << 16;
    if (i + 1 < len) chunk |= (uint32_t)(unsigned char)data[i + 1] << 8;
    if (i + 2 < len) chunk |= (uint32_t)(unsigned char)data[i + 2];
    out[n++] = BASE64_ALPHABET[(chunk >> 18) & 63];
    out[n++] = BASE64_ALPHABET[(chunk >> 12) & 63];
    out[n++] = i + 1 < len ? BASE64_ALPHABET[(chunk >> 6) & 63] : '=';
    out[n++] = i + 2 < len ? BASE64_ALPHABET[chunk & 63] : '=';
  }
  out[n] = '\0';
  return out;
}

/* True when `text` is base64 (padding optional) that decodes to at least one byte. */
static int is_base64(const char *text) {
  size_t len = strlen(text);
  while (len && text[len - 1] == '=') len--;
  if (strlen(text) - len > 2 || len < 2 || len % 4 == 1) return 0;
  for (size_t i = 0; i < len; i++)
    if (!strchr(BASE64_ALPHABET, text[i]) || text[i] == '\0') return 0;
  return 1;
}

static int fail(const char *message) {
  log_pair(PW_LOG_ERROR, "basic-auth: invalid pluginConfig: ", message);
  return 0;
}

/* Copies a JSON array of strings; 0 on any non-string element. */
static int string_array(const json *array, char ***out, size_t *count) {
  size_t n = 0;
  for (json *item = array->child; item; item = item->next) {
    if (item->kind != JSON_STRING) return 0;
    n++;
  }
  *out = calloc(n ? n : 1, sizeof(char *));
  *count = 0;
  for (json *item = array->child; item; item = item->next) (*out)[(*count)++] = copy_string(item->string);
  return 1;
}

static rule *parse_rule(const json *object) {
  if (object->kind != JSON_OBJECT) {
    fail("each basic_auth_rules entry must be an object");
    return NULL;
  }
  rule *r = calloc(1, sizeof(rule));
  static const char *const kinds[] = {"prefix", "exact", "suffix"};
  int found = 0;
  for (int k = 0; k < 3; k++) {
    json *field = json_get(object, kinds[k]);
    if (!field) continue;
    found++;
    if (field->kind != JSON_STRING || field->string_len == 0) {
      free_rules(r);
      log_pair(PW_LOG_ERROR, "basic-auth: invalid pluginConfig: must be a non-empty string: ", kinds[k]);
      return NULL;
    }
    r->kind = (match_kind)k;
    free(r->path);
    r->path = copy_string(field->string);
  }
  if (found != 1) {
    free_rules(r);
    fail("exactly one of 'prefix', 'exact' and 'suffix' must be set in each basic_auth_rules entry");
    return NULL;
  }
  json *methods = json_get(object, "request_methods");
  if (!methods || methods->kind != JSON_ARRAY || !string_array(methods, &r->methods, &r->method_count) ||
      r->method_count == 0) {
    free_rules(r);
    fail("request_methods must be a non-empty array of strings");
    return NULL;
  }
  json *credentials = json_get(object, "credentials");
  char **raw = NULL;
  size_t raw_count = 0;
  if (!credentials || credentials->kind != JSON_ARRAY || !string_array(credentials, &raw, &raw_count) ||
      raw_count == 0) {
    for (size_t i = 0; i < raw_count; i++) free(raw[i]);
    free(raw);
    free_rules(r);
    fail("credentials must be a non-empty array of strings");
    return NULL;
  }
  r->credentials = calloc(raw_count, sizeof(char *));
  for (size_t i = 0; i < raw_count; i++) {
    if (strchr(raw[i], ':')) {
      r->credentials[r->credential_count++] = base64_encode(raw[i], strlen(raw[i]));
      free(raw[i]);
    } else if (is_base64(raw[i])) {
      r->credentials[r->credential_count++] = raw[i];
    } else {
      for (size_t j = i; j < raw_count; j++) free(raw[j]);
      free(raw);
      free_rules(r);
      fail("each credential must be \"user:password\" or its base64 encoding");
      return NULL;
    }
  }
  free(raw);
  return r;
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
  rule *parsed = NULL;
  rule **tail = &parsed;
  json *list = json_get(document, "basic_auth_rules");
  if (list && list->kind != JSON_ARRAY) {
    json_free(document);
    return (uint32_t)fail("basic_auth_rules must be an array");
  }
  for (json *item = list ? list->child : NULL; item; item = item->next) {
    rule *r = parse_rule(item);
    if (!r) {
      free_rules(parsed);
      json_free(document);
      return 0;
    }
    *tail = r;
    tail = &r->next;
  }
  json *realm_field = json_get(document, "realm");
  if (realm_field && realm_field->kind != JSON_STRING) {
    free_rules(parsed);
    json_free(document);
    return (uint32_t)fail("realm must be a string");
  }
  free_rules(rules);
  rules = parsed;
  free(realm);
  realm = copy_string(realm_field ? realm_field->string : "istio");
  json_free(document);
  return 1;
}

static int rule_matches(const rule *r, const char *method, const char *path) {
  int method_ok = 0;
  for (size_t i = 0; i < r->method_count; i++)
    if (strcmp(r->methods[i], method) == 0) method_ok = 1;
  if (!method_ok) return 0;
  size_t path_len = strlen(path), rule_len = strlen(r->path);
  switch (r->kind) {
    case MATCH_PREFIX: return strncmp(path, r->path, rule_len) == 0;
    case MATCH_EXACT: return strcmp(path, r->path) == 0;
    case MATCH_SUFFIX: return path_len >= rule_len && strcmp(path + path_len - rule_len, r->path) == 0;
  }
  return 0;
}

static void deny(const char *details) {
  char *challenge = malloc(strlen("Basic realm=") + strlen(realm) + 1);
  strcpy(challenge, "Basic realm=");
  strcat(challenge, realm);
  header_list headers = {0};
  header_list_add(&headers, "www-authenticate", challenge);
  send_local_reply(401, details, "", &headers);
  free(challenge);
}

PW_EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)context_id;
  (void)num_headers;
  (void)end_of_stream;
  if (!rules) return PW_HEADERS_CONTINUE;
  char *method = get_header_string(PW_MAP_REQUEST_HEADERS, ":method");
  char *path = get_header_string(PW_MAP_REQUEST_HEADERS, ":path");
  char *authorization = get_header_string(PW_MAP_REQUEST_HEADERS, "authorization");
  uint32_t result = PW_HEADERS_CONTINUE;
  for (rule *r = rules; r && method && path; r = r->next) {
    if (!rule_matches(r, method, path)) continue;
    if (!authorization || strncmp(authorization, "Basic ", 6) != 0) {
      deny("Request denied by Basic Auth check. No Basic Authentication information found.");
      result = PW_HEADERS_STOP_ITERATION;
      break;
    }
    int accepted = 0;
    for (size_t i = 0; i < r->credential_count; i++)
      if (strcmp(authorization + 6, r->credentials[i]) == 0) accepted = 1;
    if (!accepted) {
      deny("Request denied by Basic Auth check. Invalid username and/or password");
      result = PW_HEADERS_STOP_ITERATION;
      break;
    }
  }
  free(method);
  free(path);
  free(authorization);
  return result;
}
