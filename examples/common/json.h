/*
 * A small JSON reader for plugin configuration (pluginConfig arrives as JSON text).
 * Parses the whole document into a tree; strings are NUL-terminated copies. On error it returns NULL
 * and writes a one-line reason (with the byte offset) into the caller's buffer.
 */
#ifndef WASMESH_EXAMPLES_JSON_H
#define WASMESH_EXAMPLES_JSON_H

#include <stdlib.h>
#include <string.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_kind;

typedef struct json {
  json_kind kind;
  char *key;          /* member name when this value sits in an object */
  char *string;       /* JSON_STRING */
  size_t string_len;
  double number;      /* JSON_NUMBER */
  int boolean;        /* JSON_BOOL */
  struct json *child; /* first element / member of an array / object */
  struct json *next;  /* next sibling */
} json;

typedef struct {
  const char *text;
  size_t len;
  size_t pos;
  int depth;
  char *error;
  size_t error_size;
} json_parser;

static inline void json_free(json *value) {
  while (value) {
    json *next = value->next;
    json_free(value->child);
    free(value->key);
    free(value->string);
    free(value);
    value = next;
  }
}

static inline void json_fail(json_parser *p, const char *what) {
  if (p->error[0]) return;
  /* "<what> at byte <pos>" */
  size_t n = strlen(what);
  if (n > p->error_size - 24) n = p->error_size - 24;
  memcpy(p->error, what, n);
  memcpy(p->error + n, " at byte ", 9);
  n += 9;
  char digits[12];
  int d = 0;
  size_t pos = p->pos;
  do {
    digits[d++] = (char)('0' + pos % 10);
    pos /= 10;
  } while (pos && d < 11);
  while (d) p->error[n++] = digits[--d];
  p->error[n] = '\0';
}

static inline void json_skip_space(json_parser *p) {
  while (p->pos < p->len &&
         (p->text[p->pos] == ' ' || p->text[p->pos] == '\t' || p->text[p->pos] == '\n' || p->text[p->pos] == '\r'))
    p->pos++;
}

static inline int json_hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Parses a string literal at p->pos (on the opening quote) into a malloc'd NUL-terminated copy. */
static inline char *json_parse_string(json_parser *p, size_t *out_len) {
  p->pos++; /* opening quote */
  char *out = malloc(p->len - p->pos + 1);
  size_t n = 0;
  while (p->pos < p->len) {
    char c = p->text[p->pos++];
    if (c == '"') {
      out[n] = '\0';
      *out_len = n;
      return out;
    }
    if ((unsigned char)c < 0x20) {
      p->pos--;
      json_fail(p, "control character in string");
      free(out);
      return NULL;
    }
    if (c != '\\') {
      out[n++] = c;
      continue;
    }
    if (p->pos >= p->len) break;
    char e = p->text[p->pos++];
    switch (e) {
      case '"': out[n++] = '"'; break;
      case '\\': out[n++] = '\\'; break;
      case '/': out[n++] = '/'; break;
      case 'b': out[n++] = '\b'; break;
      case 'f': out[n++] = '\f'; break;
      case 'n': out[n++] = '\n'; break;
      case 'r': out[n++] = '\r'; break;
      case 't': out[n++] = '\t'; break;
      case 'u': {
        unsigned code = 0;
        for (int i = 0; i < 4; i++) {
          int h = p->pos < p->len ? json_hex(p->text[p->pos]) : -1;
          if (h < 0) {
            json_fail(p, "bad \\u escape");
            free(out);
            return NULL;
          }
          code = code * 16 + (unsigned)h;
          p->pos++;
        }
        /* UTF-8 encode the BMP code point (surrogate pairs are kept as two 3-byte sequences). */
        if (code < 0x80) {
          out[n++] = (char)code;
        } else if (code < 0x800) {
          out[n++] = (char)(0xc0 | (code >> 6));
          out[n++] = (char)(0x80 | (code & 0x3f));
        } else {
          out[n++] = (char)(0xe0 | (code >> 12));
          out[n++] = (char)(0x80 | ((code >> 6) & 0x3f));
          out[n++] = (char)(0x80 | (code & 0x3f));
        }
        break;
      }
      default:
        p->pos--;
        json_fail(p, "bad escape in string");
        free(out);
        return NULL;
    }
  }
  json_fail(p, "unterminated string");
  free(out);
  return NULL;
}

static inline json *json_parse_value(json_parser *p);

static inline json *json_new(json_kind kind) {
  json *v = calloc(1, sizeof(json));
  v->kind = kind;
  return v;
}

static inline json *json_parse_container(json_parser *p, int is_object) {
  json *container = json_new(is_object ? JSON_OBJECT : JSON_ARRAY);
  json **tail = &container->child;
  char close = is_object ? '}' : ']';
  p->pos++;
  json_skip_space(p);
  if (p->pos < p->len && p->text[p->pos] == close) {
    p->pos++;
    return container;
  }
  for (;;) {
    char *key = NULL;
    if (is_object) {
      json_skip_space(p);
      if (p->pos >= p->len || p->text[p->pos] != '"') {
        json_fail(p, "expected a member name");
        json_free(container);
        return NULL;
      }
      size_t key_len;
      key = json_parse_string(p, &key_len);
      if (!key) {
        json_free(container);
        return NULL;
      }
      json_skip_space(p);
      if (p->pos >= p->len || p->text[p->pos] != ':') {
        free(key);
        json_fail(p, "expected ':'");
        json_free(container);
        return NULL;
      }
      p->pos++;
    }
    json *item = json_parse_value(p);
    if (!item) {
      free(key);
      json_free(container);
      return NULL;
    }
    item->key = key;
    *tail = item;
    tail = &item->next;
    json_skip_space(p);
    if (p->pos < p->len && p->text[p->pos] == ',') {
      p->pos++;
      continue;
    }
    if (p->pos < p->len && p->text[p->pos] == close) {
      p->pos++;
      return container;
    }
    json_fail(p, is_object ? "expected ',' or '}'" : "expected ',' or ']'");
    json_free(container);
    return NULL;
  }
}

static inline int json_literal(json_parser *p, const char *word) {
  size_t n = strlen(word);
  if (p->pos + n <= p->len && memcmp(p->text + p->pos, word, n) == 0) {
    p->pos += n;
    return 1;
  }
  return 0;
}

static inline json *json_parse_value(json_parser *p) {
  json_skip_space(p);
  if (p->pos >= p->len) {
    json_fail(p, "unexpected end of JSON");
    return NULL;
  }
  if (++p->depth > 64) {
    json_fail(p, "JSON nested too deeply");
    return NULL;
  }
  json *result = NULL;
  char c = p->text[p->pos];
  if (c == '{' || c == '[') {
    result = json_parse_container(p, c == '{');
  } else if (c == '"') {
    size_t len;
    char *s = json_parse_string(p, &len);
    if (s) {
      result = json_new(JSON_STRING);
      result->string = s;
      result->string_len = len;
    }
  } else if (json_literal(p, "true") || json_literal(p, "false")) {
    result = json_new(JSON_BOOL);
    result->boolean = c == 't';
  } else if (json_literal(p, "null")) {
    result = json_new(JSON_NULL);
  } else if (c == '-' || (c >= '0' && c <= '9')) {
    /* Integers and decimals without exponent are all plugin configs need; reject the rest clearly. */
    int negative = c == '-';
    if (negative) p->pos++;
    double value = 0, scale = 0;
    int digits = 0;
    while (p->pos < p->len) {
      char d = p->text[p->pos];
      if (d >= '0' && d <= '9') {
        if (scale) {
          value += (d - '0') / scale;
          scale *= 10;
        } else {
          value = value * 10 + (d - '0');
        }
        digits++;
      } else if (d == '.' && !scale) {
        scale = 10;
      } else {
        break;
      }
      p->pos++;
    }
    if (!digits || (p->pos < p->len && (p->text[p->pos] == 'e' || p->text[p->pos] == 'E'))) {
      json_fail(p, "unsupported number");
    } else {
      result = json_new(JSON_NUMBER);
      result->number = negative ? -value : value;
    }
  } else {
    json_fail(p, "unexpected character");
  }
  p->depth--;
  return result;
}

/* Parses `text`; NULL on error with the reason in `error`. Empty text parses as an empty object. */
static inline json *json_parse(const char *text, size_t len, char *error, size_t error_size) {
  json_parser p = {text, len, 0, 0, error, error_size};
  error[0] = '\0';
  json_skip_space(&p);
  if (p.pos == len) return json_new(JSON_OBJECT);
  json *root = json_parse_value(&p);
  if (!root) return NULL;
  json_skip_space(&p);
  if (p.pos != len) {
    json_fail(&p, "trailing characters after JSON");
    json_free(root);
    return NULL;
  }
  return root;
}

static inline json *json_get(const json *object, const char *key) {
  if (!object || object->kind != JSON_OBJECT) return NULL;
  for (json *m = object->child; m; m = m->next)
    if (m->key && strcmp(m->key, key) == 0) return m;
  return NULL;
}

#endif
