/*
 * fuzz_pgo.c — libFuzzer target for the pgoutput decoder (cdc/pgo.c).
 *
 * Each input is decoded three ways:
 *  1. raw: the whole input as one message, on a fresh decoder;
 *  2. primed: the whole input as one message, on a decoder that has already
 *     decoded valid Relation messages captured from PostgreSQL 15 (replica
 *     identity default, full and index), so random bytes that start with
 *     'I', 'U', 'D' or 'T' and name one of their relids reach the tuple
 *     readers;
 *  3. stream: the input split at "\xff\xffMSG" into a sequence of messages
 *     on one decoder, as a replication connection delivers them — the seeds
 *     are whole captured streams (tests/fuzz/make-seeds), so mutations keep
 *     their Relation messages and reach Insert/Update/Delete/Truncate. An
 *     empty piece calls pgo_reset().
 * Every message is copied into a heap buffer of exactly its length, so a
 * read one byte past the end is an ASan error. Properties checked on each
 * successful decode: borrowed pointers lie inside the message, tuples have
 * the relation's column count, value kinds are the four on the wire,
 * relations are the cached ones and well formed. On failure: the error
 * text is non-empty and NUL-terminated.
 */
#include "pgo.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_pgo: property failed: %s: ", #cond);                            \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Relation messages captured by scripts/capture-pgo-fixtures (v1): public.items
 * (relid 0x408d, replica identity default), audit.full_t (0x4095, full),
 * public.idx_t (0x409a, using index). */
static const char *const rel_hex[] = {
    "520000408d7075626c6963006974656d73006400050169640000000017ffffffff006e616d650000"
    "000019ffffffff007174790000000017ffffffff006d6f6f640000004087ffffffff006e6f746500"
    "00000019ffffffff",
    "520000409561756469740066756c6c5f74006600030169640000000017ffffffff0176616c000000"
    "0019ffffffff016e0000000014ffffffff",
    "520000409a7075626c6963006964785f740069000201610000000017ffffffff00620000000019ff"
    "ffffff",
};

typedef struct Msg {
    const char *buf;
    size_t len;
} Msg;

/* Volatile sink so reads of borrowed bytes are not optimised away. */
static volatile unsigned char touched;

static void touch(const char *p, size_t n)
{
    unsigned char x = 0;
    for (size_t i = 0; i < n; i++)
        x ^= (unsigned char)p[i];
    touched = x;
}

static bool inside(const Msg *m, const void *p, size_t n)
{
    const char *c = p;
    return c >= m->buf && n <= m->len && c - m->buf <= (ptrdiff_t)(m->len - n);
}

/* A borrowed NUL-terminated string must end inside the message. */
static void check_str(const Msg *m, const char *s, const char *what)
{
    CHECK(s != NULL && inside(m, s, 1), "%s outside the message", what);
    CHECK(memchr(s, '\0', m->len - (size_t)(s - m->buf)) != NULL, "%s not terminated", what);
}

static void check_relation(const PgoDecoder *dec, const PgoRelation *rel)
{
    CHECK(rel != NULL && pgo_relation(dec, rel->relid) == rel, "relation not the cached one");
    CHECK(strchr("dnfi", rel->replident) != NULL && rel->replident != '\0', "replident 0x%02x",
          (unsigned char)rel->replident);
    CHECK(rel->ncols <= INT16_MAX, "ncols %u", rel->ncols);
    CHECK(strlen(rel->qualname) ==
              strlen(rel->nspname[0] ? rel->nspname : "pg_catalog") + 1 + strlen(rel->relname),
          "qualname \"%s\"", rel->qualname);
    for (uint16_t i = 0; i < rel->ncols; i++)
        CHECK(rel->cols[i].name != NULL && rel->colnames[i] == rel->cols[i].name,
              "column %u name", i);
}

static void check_tuple(const Msg *m, const PgoRelation *rel, const PgoTuple *t)
{
    CHECK(t->natts == rel->ncols, "tuple has %u columns, relation %u", t->natts, rel->ncols);
    for (uint16_t i = 0; i < t->natts; i++) {
        const PgoValue *v = &t->values[i];
        if (v->kind == PGO_VAL_TEXT || v->kind == PGO_VAL_BINARY) {
            CHECK(v->len == 0 || inside(m, v->data, v->len), "value %u outside the message", i);
            touch(v->data, v->len);
        } else {
            CHECK(v->kind == PGO_VAL_NULL || v->kind == PGO_VAL_UNCHANGED, "value kind 0x%02x",
                  (unsigned char)v->kind);
            CHECK(v->len == 0 && v->data == NULL, "NULL/unchanged value with data");
        }
    }
}

static void check_change(const PgoDecoder *dec, const Msg *m, const PgoMsg *out)
{
    const PgoRelation *rel = out->u.change.rel;
    char ok = out->u.change.old_kind;

    check_relation(dec, rel);
    if (out->kind == PGO_DELETE)
        CHECK(ok == 'K' || ok == 'O', "delete old kind 0x%02x", (unsigned char)ok);
    else if (out->kind == PGO_INSERT)
        CHECK(ok == 0, "insert with an old tuple");
    else
        CHECK(ok == 0 || ok == 'K' || ok == 'O', "update old kind 0x%02x", (unsigned char)ok);
    if (ok != 0)
        check_tuple(m, rel, &out->u.change.old_tuple);
    if (out->kind != PGO_DELETE)
        check_tuple(m, rel, &out->u.change.new_tuple);
}

static void check_msg(const PgoDecoder *dec, const Msg *m, const PgoMsg *out)
{
    CHECK((unsigned char)m->buf[0] == (unsigned char)out->kind, "kind %c for type byte 0x%02x",
          out->kind, (unsigned char)m->buf[0]);
    switch (out->kind) {
    case PGO_RELATION:
        check_relation(dec, out->u.relation.rel);
        break;
    case PGO_INSERT:
    case PGO_UPDATE:
    case PGO_DELETE:
        check_change(dec, m, out);
        break;
    case PGO_TRUNCATE:
        CHECK((size_t)out->u.truncate.nrels * 4 + 6 == m->len, "truncate of %u relations in %zu bytes",
              out->u.truncate.nrels, m->len);
        for (uint32_t i = 0; i < out->u.truncate.nrels; i++)
            check_relation(dec, out->u.truncate.rels[i]);
        break;
    case PGO_MESSAGE:
        check_str(m, out->u.message.prefix, "message prefix");
        CHECK(out->u.message.len == 0 || inside(m, out->u.message.content, out->u.message.len),
              "message content outside");
        touch(out->u.message.content, out->u.message.len);
        break;
    case PGO_ORIGIN:
        check_str(m, out->u.origin.name, "origin name");
        break;
    case PGO_TYPE:
        check_str(m, out->u.type.nspname, "type namespace");
        check_str(m, out->u.type.typname, "type name");
        break;
    case PGO_BEGIN:
    case PGO_COMMIT:
        break;
    }
}

/* Decode bytes [p, p+n) as one message from an exact-size heap copy. */
static void decode_one(PgoDecoder *dec, const uint8_t *p, size_t n)
{
    char *copy = malloc(n ? n : 1);
    Msg m = {copy, n};
    PgoMsg out;

    CHECK(copy != NULL, "out of memory");
    if (n > 0)
        memcpy(copy, p, n);
    if (pgo_decode(dec, n ? copy : NULL, n, &out) == 0) {
        CHECK(pgo_errstr(dec)[0] == '\0', "error text after success: %s", pgo_errstr(dec));
        check_msg(dec, &m, &out);
    } else {
        const char *e = pgo_errstr(dec);
        CHECK(e[0] != '\0' && strlen(e) < 256, "empty or overlong error text");
    }
    free(copy);
}

static size_t unhex(const char *hex, uint8_t *out)
{
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
    return n;
}

static void prime(PgoDecoder *dec)
{
    uint8_t buf[256];
    PgoMsg out;
    for (size_t i = 0; i < sizeof rel_hex / sizeof rel_hex[0]; i++) {
        size_t n = unhex(rel_hex[i], buf);
        CHECK(pgo_decode(dec, (const char *)buf, n, &out) == 0, "priming relation %zu: %s", i,
              pgo_errstr(dec));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char sep[] = "\xff\xffMSG";
    PgoDecoder *dec = pgo_new();
    size_t start = 0;

    decode_one(dec, data, size);
    pgo_free(dec);

    dec = pgo_new();
    prime(dec);
    decode_one(dec, data, size);
    pgo_free(dec);

    dec = pgo_new();
    while (start <= size) {
        const uint8_t *cut = memmem(data + start, size - start, sep, sizeof sep - 1);
        size_t end = cut ? (size_t)(cut - data) : size;
        if (end == start)
            pgo_reset(dec);
        else
            decode_one(dec, data + start, end - start);
        if (cut == NULL)
            break;
        start = end + sizeof sep - 1;
    }
    pgo_free(dec);
    return 0;
}
