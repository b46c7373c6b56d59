/*
 * Unit tests for pgo.c, the pgoutput decoder.
 *
 * The fixtures under tests/fixtures/pgo/ are pgoutput messages captured from a
 * real PostgreSQL 15 by scripts/capture-pgo-fixtures: one scenario per file,
 * in three variants (proto_version 1, proto_version 2, proto_version 1 with
 * binary values). The scenario tests decode each file in order and check the
 * fields against what the capture script's SQL wrote. Then every proper prefix
 * of every fixture message must fail cleanly, hand-built corrupt messages must
 * fail with specific errors, and a deterministic byte-flip loop must never
 * crash (run it under the ASan build to prove no out-of-bounds read).
 * Every message is copied into a buffer of exactly its length, so an
 * over-read is caught by AddressSanitizer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "pgo.h"

#ifndef SOURCE_DIR
#define SOURCE_DIR "."
#endif

#define FIXTURE_DIR SOURCE_DIR "/tests/fixtures/pgo/"

static const char *const scenarios[] = {"insert",   "update",  "delete", "full", "toast",
                                        "truncate", "message", "origin", "alter"};
static const char *const variants[] = {"v1", "v2", "bin"};
#define NSCENARIOS (sizeof scenarios / sizeof scenarios[0])
#define NVARIANTS (sizeof variants / sizeof variants[0])

/* ---- fixture loading --------------------------------------------------- */

typedef struct Fixture {
    size_t n;
    char **msgs; /* each malloc'd with exactly lens[i] bytes */
    size_t *lens;
} Fixture;

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static void fixture_add(Fixture *fx, const char *hex, size_t hexlen)
{
    size_t n = hexlen / 2;
    char *msg = malloc(n);
    assert_non_null(msg);
    assert_int_equal(hexlen % 2, 0);
    for (size_t i = 0; i < n; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        assert_true(hi >= 0 && lo >= 0);
        msg[i] = (char)(hi << 4 | lo);
    }
    fx->msgs = realloc(fx->msgs, (fx->n + 1) * sizeof *fx->msgs);
    fx->lens = realloc(fx->lens, (fx->n + 1) * sizeof *fx->lens);
    assert_non_null(fx->msgs);
    assert_non_null(fx->lens);
    fx->msgs[fx->n] = msg;
    fx->lens[fx->n] = n;
    fx->n++;
}

/* Load tests/fixtures/pgo/<scenario>.<variant>.hex: '#' lines are comments. */
static Fixture fixture_load(const char *scenario, const char *variant)
{
    Fixture fx = {0};
    char path[512];
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    FILE *f;

    snprintf(path, sizeof path, FIXTURE_DIR "%s.%s.hex", scenario, variant);
    f = fopen(path, "r");
    if (f == NULL)
        fail_msg("cannot open fixture %s", path);
    while ((got = getline(&line, &cap, f)) >= 0) {
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r'))
            line[--got] = '\0';
        if (got == 0 || line[0] == '#')
            continue;
        fixture_add(&fx, line, (size_t)got);
    }
    free(line);
    fclose(f);
    assert_true(fx.n > 0);
    return fx;
}

static void fixture_free(Fixture *fx)
{
    for (size_t i = 0; i < fx->n; i++)
        free(fx->msgs[i]);
    free(fx->msgs);
    free(fx->lens);
    memset(fx, 0, sizeof *fx);
}

/* ---- decoding a fixture as a stream ----------------------------------- */

typedef struct Stream {
    Fixture fx;
    size_t next;
    bool binary; /* values sent with 'b' (binary true) */
    PgoDecoder *dec;
    PgoMsg msg;
    uint64_t final_lsn; /* of the open transaction, 0 when none */
    int64_t begin_time;
    uint64_t last_end_lsn;
} Stream;

static void stream_open(Stream *s, const char *scenario, const char *variant)
{
    memset(s, 0, sizeof *s);
    s->fx = fixture_load(scenario, variant);
    s->binary = strcmp(variant, "bin") == 0;
    s->dec = pgo_new();
}

static void stream_close(Stream *s)
{
    assert_int_equal(s->next, s->fx.n); /* every captured message was checked */
    assert_int_equal(s->final_lsn, 0);  /* no transaction left open */
    pgo_free(s->dec);
    fixture_free(&s->fx);
}

/* Check transaction framing: Begin/Commit pair up with consistent LSNs. */
static void stream_check_framing(Stream *s, const PgoMsg *m)
{
    if (m->kind == PGO_BEGIN) {
        assert_int_equal(s->final_lsn, 0);
        assert_true(m->u.begin.final_lsn > s->last_end_lsn);
        assert_true(m->u.begin.xid > 0);
        s->final_lsn = m->u.begin.final_lsn;
        s->begin_time = m->u.begin.commit_time;
    } else if (m->kind == PGO_COMMIT) {
        assert_true(s->final_lsn != 0);
        assert_int_equal(m->u.commit.flags, 0);
        assert_int_equal(m->u.commit.commit_lsn, s->final_lsn);
        assert_true(m->u.commit.end_lsn > m->u.commit.commit_lsn);
        assert_int_equal(m->u.commit.commit_time, s->begin_time);
        s->last_end_lsn = m->u.commit.end_lsn;
        s->final_lsn = 0;
    } else if (m->kind != PGO_MESSAGE && m->kind != PGO_ORIGIN) {
        assert_true(s->final_lsn != 0); /* changes only inside a transaction */
    }
}

/* Decode the next fixture message, which must succeed and be of `kind`. */
static const PgoMsg *next_msg(Stream *s, PgoKind kind)
{
    int rc;
    if (s->next >= s->fx.n)
        fail_msg("fixture ended, expected message '%c'", (char)kind);
    rc = pgo_decode(s->dec, s->fx.msgs[s->next], s->fx.lens[s->next], &s->msg);
    if (rc != 0)
        fail_msg("message %zu: %s", s->next, pgo_errstr(s->dec));
    assert_string_equal(pgo_errstr(s->dec), "");
    if (s->msg.kind != kind)
        fail_msg("message %zu: got '%c', expected '%c'", s->next, (char)s->msg.kind, (char)kind);
    s->next++;
    stream_check_framing(s, &s->msg);
    return &s->msg;
}

/* ---- value assertions ------------------------------------------------- */

static void assert_bytes(const PgoValue *v, char kind, const char *data, size_t len)
{
    assert_int_equal(v->kind, kind);
    assert_int_equal(v->len, len);
    assert_memory_equal(v->data, data, len);
}

/* A text-like column: same bytes in text and binary mode. */
static void assert_str(const Stream *s, const PgoValue *v, const char *text)
{
    assert_bytes(v, s->binary ? 'b' : 't', text, strlen(text));
}

/* An integer column of `width` bytes (int4 = 4, int8 = 8). */
static void assert_int(const Stream *s, const PgoValue *v, int64_t val, size_t width)
{
    if (s->binary) {
        uint64_t got = 0;
        assert_int_equal(v->kind, 'b');
        assert_int_equal(v->len, width);
        for (size_t i = 0; i < width; i++)
            got = got << 8 | (unsigned char)v->data[i];
        assert_int_equal(got, (uint64_t)val);
    } else {
        char text[32];
        snprintf(text, sizeof text, "%lld", (long long)val);
        assert_bytes(v, 't', text, strlen(text));
    }
}

static void assert_sqlnull(const PgoValue *v)
{
    assert_int_equal(v->kind, 'n');
    assert_int_equal(v->len, 0);
    assert_null(v->data);
}

static void assert_cols(const PgoRelation *rel, const char *const *names, const bool *keys,
                        const uint32_t *oids, uint16_t n)
{
    assert_int_equal(rel->ncols, n);
    for (uint16_t i = 0; i < n; i++) {
        assert_string_equal(rel->cols[i].name, names[i]);
        assert_ptr_equal(rel->colnames[i], rel->cols[i].name);
        assert_int_equal(rel->cols[i].key, keys[i]);
        if (oids[i] != 0)
            assert_int_equal(rel->cols[i].type_oid, oids[i]);
        assert_int_equal(rel->cols[i].typmod, -1);
    }
}

#define INT4OID 23
#define INT8OID 20
#define TEXTOID 25

/* Type 'mood' then Relation public.items (5 columns); returns the relation. */
static const PgoRelation *expect_items(Stream *s, uint16_t ncols)
{
    static const char *const names[] = {"id", "name", "qty", "mood", "note", "extra"};
    static const bool keys[] = {true, false, false, false, false, false};
    uint32_t oids[] = {INT4OID, TEXTOID, INT4OID, 0, TEXTOID, TEXTOID};
    const PgoMsg *m = next_msg(s, PGO_TYPE);
    const PgoRelation *rel;

    assert_string_equal(m->u.type.nspname, "public");
    assert_string_equal(m->u.type.typname, "mood");
    assert_true(m->u.type.oid >= 16384); /* user type */
    oids[3] = m->u.type.oid;
    rel = next_msg(s, PGO_RELATION)->u.relation.rel;
    assert_string_equal(rel->nspname, "public");
    assert_string_equal(rel->relname, "items");
    assert_string_equal(rel->qualname, "public.items");
    assert_int_equal(rel->replident, 'd');
    assert_ptr_equal(pgo_relation(s->dec, rel->relid), rel);
    assert_cols(rel, names, keys, oids, ncols);
    return rel;
}

/* Insert into rel; returns the new tuple after checking the framing. */
static const PgoTuple *expect_insert(Stream *s, const PgoRelation *rel)
{
    const PgoMsg *m = next_msg(s, PGO_INSERT);
    assert_ptr_equal(m->u.change.rel, rel);
    assert_int_equal(m->u.change.old_kind, 0);
    assert_int_equal(m->u.change.new_tuple.natts, rel->ncols);
    return &m->u.change.new_tuple;
}

/* ---- scenario tests --------------------------------------------------- */

static const char pear_note[] = "a \"quoted\"\ttab note \xc3\xbcn\xc3\xaf"
                                "code";

static void check_insert(Stream *s)
{
    static const char *const idx_names[] = {"a", "b"};
    static const bool idx_keys[] = {true, false};
    static const uint32_t idx_oids[] = {INT4OID, TEXTOID};
    const PgoRelation *items, *idx;
    const PgoTuple *t;

    next_msg(s, PGO_BEGIN);
    items = expect_items(s, 5);
    t = expect_insert(s, items);
    assert_int(s, &t->values[0], 1, 4);
    assert_str(s, &t->values[1], "apple");
    assert_int(s, &t->values[2], 3, 4);
    assert_str(s, &t->values[3], "happy");
    assert_sqlnull(&t->values[4]);
    t = expect_insert(s, items);
    assert_int(s, &t->values[0], 2, 4);
    assert_str(s, &t->values[1], "pear");
    assert_sqlnull(&t->values[2]);
    assert_str(s, &t->values[3], "sad");
    assert_str(s, &t->values[4], pear_note);
    idx = next_msg(s, PGO_RELATION)->u.relation.rel;
    assert_string_equal(idx->qualname, "public.idx_t");
    assert_int_equal(idx->replident, 'i');
    assert_cols(idx, idx_names, idx_keys, idx_oids, 2);
    assert_true(idx->relid != items->relid);
    t = expect_insert(s, idx);
    assert_int(s, &t->values[0], 7, 4);
    assert_str(s, &t->values[1], "seven");
    next_msg(s, PGO_COMMIT);
}

static void check_update(Stream *s)
{
    const PgoRelation *items;
    const PgoMsg *m;
    const PgoTuple *o, *n;

    next_msg(s, PGO_BEGIN);
    items = expect_items(s, 5);
    m = next_msg(s, PGO_UPDATE);
    assert_ptr_equal(m->u.change.rel, items);
    assert_int_equal(m->u.change.old_kind, 0); /* key unchanged: no old tuple */
    assert_int_equal(m->u.change.old_tuple.natts, 0);
    n = &m->u.change.new_tuple;
    assert_int_equal(n->natts, 5);
    assert_int(s, &n->values[0], 1, 4);
    assert_str(s, &n->values[1], "apple");
    assert_int(s, &n->values[2], 7, 4);
    assert_str(s, &n->values[3], "happy");
    assert_sqlnull(&n->values[4]);
    next_msg(s, PGO_COMMIT);

    next_msg(s, PGO_BEGIN);
    m = next_msg(s, PGO_UPDATE); /* relation already sent in this stream */
    assert_ptr_equal(m->u.change.rel, items);
    assert_int_equal(m->u.change.old_kind, 'K');
    o = &m->u.change.old_tuple;
    n = &m->u.change.new_tuple;
    assert_int_equal(o->natts, 5);
    assert_ptr_not_equal(o->values, n->values); /* separate scratch arrays */
    assert_int(s, &o->values[0], 2, 4);
    for (int i = 1; i < 5; i++)
        assert_sqlnull(&o->values[i]); /* only identity columns are sent */
    assert_int(s, &n->values[0], 20, 4);
    assert_str(s, &n->values[1], "pear");
    assert_sqlnull(&n->values[2]);
    assert_str(s, &n->values[3], "sad");
    assert_str(s, &n->values[4], pear_note);
    next_msg(s, PGO_COMMIT);
}

static void check_delete(Stream *s)
{
    const PgoRelation *items;
    const PgoMsg *m;

    next_msg(s, PGO_BEGIN);
    items = expect_items(s, 5);
    m = next_msg(s, PGO_DELETE);
    assert_ptr_equal(m->u.change.rel, items);
    assert_int_equal(m->u.change.old_kind, 'K');
    assert_int_equal(m->u.change.new_tuple.natts, 0);
    assert_int_equal(m->u.change.old_tuple.natts, 5);
    assert_int(s, &m->u.change.old_tuple.values[0], 20, 4);
    for (int i = 1; i < 5; i++)
        assert_sqlnull(&m->u.change.old_tuple.values[i]);
    next_msg(s, PGO_COMMIT);
}

static void check_full_row(const Stream *s, const PgoTuple *t, const char *val, int64_t n)
{
    assert_int_equal(t->natts, 3);
    assert_int(s, &t->values[0], 1, 4);
    assert_str(s, &t->values[1], val);
    if (n < 0)
        assert_sqlnull(&t->values[2]);
    else
        assert_int(s, &t->values[2], n, 8);
}

static void check_full(Stream *s)
{
    static const char *const names[] = {"id", "val", "n"};
    static const bool keys[] = {true, true, true}; /* FULL: every column */
    static const uint32_t oids[] = {INT4OID, TEXTOID, INT8OID};
    const PgoRelation *rel;
    const PgoMsg *m;

    next_msg(s, PGO_BEGIN);
    rel = next_msg(s, PGO_RELATION)->u.relation.rel;
    assert_string_equal(rel->nspname, "audit");
    assert_string_equal(rel->qualname, "audit.full_t");
    assert_int_equal(rel->replident, 'f');
    assert_cols(rel, names, keys, oids, 3);
    check_full_row(s, expect_insert(s, rel), "one", -1);
    next_msg(s, PGO_COMMIT);

    next_msg(s, PGO_BEGIN);
    m = next_msg(s, PGO_UPDATE);
    assert_ptr_equal(m->u.change.rel, rel);
    assert_int_equal(m->u.change.old_kind, 'O');
    check_full_row(s, &m->u.change.old_tuple, "one", -1);
    check_full_row(s, &m->u.change.new_tuple, "uno", 42);
    next_msg(s, PGO_COMMIT);

    next_msg(s, PGO_BEGIN);
    m = next_msg(s, PGO_DELETE);
    assert_int_equal(m->u.change.old_kind, 'O');
    check_full_row(s, &m->u.change.old_tuple, "uno", 42);
    next_msg(s, PGO_COMMIT);
}

static void check_toast(Stream *s)
{
    const PgoRelation *rel;
    const PgoTuple *t;
    const PgoMsg *m;

    next_msg(s, PGO_BEGIN);
    rel = next_msg(s, PGO_RELATION)->u.relation.rel;
    assert_string_equal(rel->qualname, "public.big");
    t = expect_insert(s, rel);
    assert_int(s, &t->values[0], 1, 4);
    assert_int_equal(t->values[1].kind, s->binary ? 'b' : 't');
    assert_int_equal(t->values[1].len, 300 * 32); /* 300 md5 hex digests */
    assert_memory_equal(t->values[1].data, "c4ca4238a0b923820dcc509a6f75849b", 32); /* md5('1') */
    assert_int(s, &t->values[2], 0, 4);
    next_msg(s, PGO_COMMIT);

    next_msg(s, PGO_BEGIN);
    m = next_msg(s, PGO_UPDATE);
    assert_int_equal(m->u.change.old_kind, 0);
    t = &m->u.change.new_tuple;
    assert_int(s, &t->values[0], 1, 4);
    assert_int_equal(t->values[1].kind, PGO_VAL_UNCHANGED);
    assert_int_equal(t->values[1].len, 0);
    assert_null(t->values[1].data);
    assert_int(s, &t->values[2], 1, 4);
    next_msg(s, PGO_COMMIT);
}

static void check_truncate(Stream *s)
{
    const PgoRelation *parent, *child;
    const PgoMsg *m;

    next_msg(s, PGO_BEGIN);
    parent = next_msg(s, PGO_RELATION)->u.relation.rel;
    assert_string_equal(parent->qualname, "public.parent");
    child = next_msg(s, PGO_RELATION)->u.relation.rel;
    assert_string_equal(child->qualname, "public.child");
    assert_string_equal(child->colnames[1], "parent_id");
    m = next_msg(s, PGO_TRUNCATE);
    assert_int_equal(m->u.truncate.options, PGO_TRUNCATE_CASCADE | PGO_TRUNCATE_RESTART_IDENTITY);
    assert_int_equal(m->u.truncate.nrels, 2);
    assert_ptr_equal(m->u.truncate.rels[0], parent);
    assert_ptr_equal(m->u.truncate.rels[1], child);
    next_msg(s, PGO_COMMIT);

    next_msg(s, PGO_BEGIN);
    child = next_msg(s, PGO_RELATION)->u.relation.rel; /* resent: cache replaced */
    assert_string_equal(child->qualname, "public.child");
    m = next_msg(s, PGO_TRUNCATE);
    assert_int_equal(m->u.truncate.options, 0);
    assert_int_equal(m->u.truncate.nrels, 1);
    assert_ptr_equal(m->u.truncate.rels[0], child);
    next_msg(s, PGO_COMMIT);
}

static void check_message(Stream *s)
{
    static const char content[] = "in-transaction content";
    const PgoTuple *t;
    const PgoMsg *m;
    uint64_t final_lsn, commit_end;

    final_lsn = next_msg(s, PGO_BEGIN)->u.begin.final_lsn;
    t = expect_insert(s, expect_items(s, 5));
    assert_int(s, &t->values[0], 3, 4);
    m = next_msg(s, PGO_MESSAGE);
    assert_true(m->u.message.transactional);
    assert_string_equal(m->u.message.prefix, "walbust");
    assert_int_equal(m->u.message.len, strlen(content));
    assert_memory_equal(m->u.message.content, content, strlen(content));
    /* PostgreSQL 15 reports a transactional message at its commit's LSN */
    assert_true(m->u.message.lsn > 0 && m->u.message.lsn <= final_lsn);
    commit_end = next_msg(s, PGO_COMMIT)->u.commit.end_lsn;

    m = next_msg(s, PGO_MESSAGE); /* outside any transaction */
    assert_false(m->u.message.transactional);
    assert_string_equal(m->u.message.prefix, "walbust.nt");
    assert_int_equal(m->u.message.len, 4);
    assert_memory_equal(m->u.message.content, "\x00\xff\x0a\x41", 4);
    assert_true(m->u.message.lsn >= commit_end);
}

static void check_origin(Stream *s)
{
    /* pg_replication_origin_xact_setup('0/12345678', '2024-01-02 03:04:05+00') */
    const int64_t origin_time = (INT64_C(1704164645) - INT64_C(946684800)) * 1000000;
    const PgoTuple *t;
    const PgoMsg *m;

    m = next_msg(s, PGO_BEGIN);
    assert_int_equal(m->u.begin.commit_time, origin_time);
    m = next_msg(s, PGO_ORIGIN);
    assert_int_equal(m->u.origin.lsn, UINT64_C(0x12345678));
    assert_string_equal(m->u.origin.name, "walbust_fixture");
    t = expect_insert(s, expect_items(s, 5));
    assert_int(s, &t->values[0], 4, 4);
    assert_str(s, &t->values[1], "fig");
    assert_int(s, &t->values[2], 2, 4);
    assert_sqlnull(&t->values[3]);
    assert_sqlnull(&t->values[4]);
    next_msg(s, PGO_COMMIT);
}

/* ALTER TABLE ADD COLUMN mid-stream: the Relation is resent and replaces the
 * cached entry with a new shape and a new generation. */
static void check_alter(Stream *s)
{
    const PgoRelation *before, *after;
    const PgoTuple *t;
    uint32_t relid, gen_before;

    next_msg(s, PGO_BEGIN);
    before = expect_items(s, 5);
    relid = before->relid;
    gen_before = before->generation;
    t = expect_insert(s, before);
    assert_str(s, &t->values[1], "kiwi");
    next_msg(s, PGO_COMMIT);

    next_msg(s, PGO_BEGIN);
    after = expect_items(s, 6); /* `before` is now dangling: don't touch it */
    assert_int_equal(after->relid, relid);
    assert_true(after->generation > gen_before);
    assert_ptr_equal(pgo_relation(s->dec, relid), after);
    t = expect_insert(s, after);
    assert_int_equal(t->natts, 6);
    assert_int(s, &t->values[0], 6, 4);
    assert_str(s, &t->values[1], "lime");
    assert_sqlnull(&t->values[4]);
    assert_str(s, &t->values[5], "extra!");
    next_msg(s, PGO_COMMIT);
}

static void run_scenario(const char *scenario, void (*check)(Stream *s))
{
    for (size_t v = 0; v < NVARIANTS; v++) {
        Stream s;
        stream_open(&s, scenario, variants[v]);
        check(&s);
        stream_close(&s);
    }
}

static void test_insert(void **state)
{
    (void)state;
    run_scenario("insert", check_insert);
}
static void test_update(void **state)
{
    (void)state;
    run_scenario("update", check_update);
}
static void test_delete(void **state)
{
    (void)state;
    run_scenario("delete", check_delete);
}
static void test_full(void **state)
{
    (void)state;
    run_scenario("full", check_full);
}
static void test_toast(void **state)
{
    (void)state;
    run_scenario("toast", check_toast);
}
static void test_truncate(void **state)
{
    (void)state;
    run_scenario("truncate", check_truncate);
}
static void test_message(void **state)
{
    (void)state;
    run_scenario("message", check_message);
}
static void test_origin(void **state)
{
    (void)state;
    run_scenario("origin", check_origin);
}
static void test_alter(void **state)
{
    (void)state;
    run_scenario("alter", check_alter);
}

/* ---- truncated input -------------------------------------------------- */

static uint32_t be32_at(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

/* Decode len bytes of data from a heap copy of exactly that size, so that
 * AddressSanitizer catches any read past the end. */
static int decode_copy(PgoDecoder *dec, const void *data, size_t len, PgoMsg *out)
{
    char *copy = malloc(len ? len : 1);
    int rc;
    assert_non_null(copy);
    if (len > 0)
        memcpy(copy, data, len);
    rc = pgo_decode(dec, copy, len, out);
    free(copy);
    if (rc != 0)
        assert_true(pgo_errstr(dec)[0] != '\0');
    return rc; /* on success *out may point into freed memory: inspect only kind */
}

/* Every proper prefix of every captured message must fail, and a failed
 * Relation prefix must leave the cache alone. */
static void check_prefixes(const Fixture *fx, PgoDecoder *dec)
{
    PgoMsg m;
    for (size_t i = 0; i < fx->n; i++) {
        const char *msg = fx->msgs[i];
        bool is_rel = fx->lens[i] >= 5 && msg[0] == 'R';
        const PgoRelation *before = is_rel ? pgo_relation(dec, be32_at(msg + 1)) : NULL;
        uint32_t gen = before != NULL ? before->generation : 0;

        for (size_t plen = 0; plen < fx->lens[i]; plen++) {
            if (decode_copy(dec, msg, plen, &m) != -1)
                fail_msg("prefix %zu of message %zu ('%c') decoded", plen, i, msg[0]);
        }
        if (is_rel) {
            assert_ptr_equal(pgo_relation(dec, be32_at(msg + 1)), before);
            if (before != NULL)
                assert_int_equal(before->generation, gen);
        }
        if (pgo_decode(dec, msg, fx->lens[i], &m) != 0)
            fail_msg("message %zu: %s", i, pgo_errstr(dec));
    }
}

static void test_truncated_prefixes(void **state)
{
    (void)state;
    for (size_t sc = 0; sc < NSCENARIOS; sc++) {
        for (size_t v = 0; v < NVARIANTS; v++) {
            Fixture fx = fixture_load(scenarios[sc], variants[v]);
            PgoDecoder *dec = pgo_new();
            check_prefixes(&fx, dec);
            pgo_free(dec);
            fixture_free(&fx);
        }
    }
}

/* One byte appended to any captured message is a trailing-bytes error. */
static void test_trailing_bytes(void **state)
{
    (void)state;
    for (size_t sc = 0; sc < NSCENARIOS; sc++) {
        Fixture fx = fixture_load(scenarios[sc], "v1");
        PgoDecoder *dec = pgo_new();
        PgoMsg m;
        for (size_t i = 0; i < fx.n; i++) {
            char *longer = malloc(fx.lens[i] + 1);
            assert_non_null(longer);
            memcpy(longer, fx.msgs[i], fx.lens[i]);
            longer[fx.lens[i]] = 'N';
            assert_int_equal(pgo_decode(dec, longer, fx.lens[i] + 1, &m), -1);
            assert_non_null(strstr(pgo_errstr(dec), "1 trailing bytes after"));
            free(longer);
            assert_int_equal(pgo_decode(dec, fx.msgs[i], fx.lens[i], &m), 0);
        }
        pgo_free(dec);
        fixture_free(&fx);
    }
}

/* ---- hand-built messages ---------------------------------------------- */

typedef struct Msg {
    unsigned char b[512];
    size_t n;
} Msg;

static void put8(Msg *m, unsigned v)
{
    assert_true(m->n < sizeof m->b);
    m->b[m->n++] = (unsigned char)v;
}

static void put16(Msg *m, unsigned v)
{
    put8(m, v >> 8 & 0xff);
    put8(m, v & 0xff);
}

static void put32(Msg *m, uint32_t v)
{
    put16(m, v >> 16);
    put16(m, v & 0xffff);
}

static void put64(Msg *m, uint64_t v)
{
    put32(m, (uint32_t)(v >> 32));
    put32(m, (uint32_t)v);
}

static void putraw(Msg *m, const void *p, size_t n)
{
    assert_true(n <= sizeof m->b - m->n);
    memcpy(m->b + m->n, p, n);
    m->n += n;
}

static void putstr(Msg *m, const char *s)
{
    putraw(m, s, strlen(s) + 1);
}

#define REL_T 16384u

/* Relation relid nsp.t with ncols int4 columns c1..cN, c1 the key. */
static Msg relation_msg(uint32_t relid, const char *nsp, uint16_t ncols)
{
    Msg m = {.n = 0};
    put8(&m, 'R');
    put32(&m, relid);
    putstr(&m, nsp);
    putstr(&m, "t");
    put8(&m, 'd');
    put16(&m, ncols);
    for (uint16_t i = 0; i < ncols; i++) {
        char name[16];
        snprintf(name, sizeof name, "c%u", (unsigned)i + 1);
        put8(&m, i == 0);
        putstr(&m, name);
        put32(&m, INT4OID);
        put32(&m, 0xffffffff);
    }
    return m;
}

/* Decode a message that must succeed, from m's own storage. */
static const PgoMsg *ok(PgoDecoder *dec, const Msg *m, PgoMsg *out)
{
    if (pgo_decode(dec, (const char *)m->b, m->n, out) != 0)
        fail_msg("unexpected error: %s", pgo_errstr(dec));
    assert_string_equal(pgo_errstr(dec), "");
    return out;
}

/* Decode a message that must fail with `want` in the error text. */
static void bad(PgoDecoder *dec, const Msg *m, const char *want)
{
    PgoMsg out;
    if (decode_copy(dec, m->b, m->n, &out) != -1)
        fail_msg("decoded, expected error \"%s\"", want);
    if (strstr(pgo_errstr(dec), want) == NULL)
        fail_msg("error \"%s\" lacks \"%s\"", pgo_errstr(dec), want);
}

static PgoDecoder *dec_with_t(void)
{
    PgoDecoder *dec = pgo_new();
    Msg r = relation_msg(REL_T, "public", 2);
    PgoMsg out;
    ok(dec, &r, &out);
    return dec;
}

/* 'I' REL_T 'N' natts */
static Msg insert_head(uint32_t relid, uint16_t natts)
{
    Msg m = {.n = 0};
    put8(&m, 'I');
    put32(&m, relid);
    put8(&m, 'N');
    put16(&m, natts);
    return m;
}

static void test_exact_errors(void **state)
{
    PgoDecoder *dec = dec_with_t();
    Msg m = insert_head(REL_T, 2);
    PgoMsg out;
    (void)state;

    put8(&m, 't');
    put16(&m, 0); /* two of the four length bytes */
    assert_int_equal(decode_copy(dec, m.b, m.n, &out), -1);
    assert_string_equal(pgo_errstr(dec),
                        "truncated Insert message: need 4 bytes at offset 9, have 2");
    m = insert_head(99, 2);
    assert_int_equal(decode_copy(dec, m.b, m.n, &out), -1);
    assert_string_equal(pgo_errstr(dec),
                        "unknown relation id 99 in Insert message (no Relation message seen)");
    m = insert_head(REL_T, 3);
    assert_int_equal(decode_copy(dec, m.b, m.n, &out), -1);
    assert_string_equal(pgo_errstr(dec),
                        "Insert message for relation public.t has 3 columns, relation has 2");
    assert_int_equal(pgo_decode(dec, "", 0, &out), -1);
    assert_string_equal(pgo_errstr(dec), "empty pgoutput message");
    assert_int_equal(pgo_decode(dec, "Z", 1, &out), -1);
    assert_string_equal(pgo_errstr(dec), "unknown pgoutput message type 'Z' (0x5a)");
    assert_int_equal(pgo_decode(dec, "\x01", 1, &out), -1);
    assert_string_equal(pgo_errstr(dec), "unknown pgoutput message type 0x01");
    pgo_free(dec);
}

static void test_corrupt_lengths(void **state)
{
    static const uint32_t huge[] = {0x7fffffff, 0xffffffff, 0x80000000, 4};
    static const char *const want[] = {
        "length 2147483647 at offset 9 exceeds the 3 bytes", "negative column value length -1",
        "negative column value length -2147483648", "length 4 at offset 9 exceeds the 3 bytes"};
    PgoDecoder *dec = dec_with_t();
    (void)state;

    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        Msg m = insert_head(REL_T, 2);
        put8(&m, 't');
        put32(&m, huge[i]);
        putraw(&m, "abc", 3);
        bad(dec, &m, want[i]);
    }
    for (size_t i = 0; i < 3; i++) {
        Msg m = {.n = 0};
        put8(&m, 'M');
        put8(&m, 1);
        put64(&m, 42);
        putstr(&m, "p");
        put32(&m, huge[i]);
        putraw(&m, "xyz", 3);
        bad(dec, &m, i == 0 ? "content length 2147483647" : "negative content length");
    }
    pgo_free(dec);
}

static void test_corrupt_tuples(void **state)
{
    PgoDecoder *dec = dec_with_t();
    Msg m;
    (void)state;

    m = insert_head(REL_T, 1);
    put8(&m, 'n');
    bad(dec, &m, "has 1 columns, relation has 2");
    m = insert_head(REL_T, 0xffff);
    bad(dec, &m, "has 65535 columns, relation has 2");
    m = insert_head(REL_T, 2);
    put8(&m, 'n');
    put8(&m, 'x');
    bad(dec, &m, "unknown tuple value kind 0x78 for column 2 at offset 9 in Insert message");
    m = insert_head(REL_T, 2);
    m.b[5] = 'K';
    bad(dec, &m, "unexpected tuple tag 0x4b at offset 5 in Insert message");
    m = insert_head(REL_T, 2);
    m.b[0] = 'D';
    m.b[5] = 'N';
    bad(dec, &m, "unexpected tuple tag 0x4e at offset 5 in Delete message");
    m = insert_head(REL_T, 2);
    m.b[0] = 'U';
    m.b[5] = 'X';
    bad(dec, &m, "unexpected tuple tag 0x58");
    m = insert_head(REL_T, 2); /* Update 'K' tuple followed by 'K' instead of 'N' */
    m.b[0] = 'U';
    m.b[5] = 'K';
    put8(&m, 'n');
    put8(&m, 'n');
    put8(&m, 'K');
    bad(dec, &m, "unexpected tuple tag 0x4b at offset 10 in Update message");
    m.n--; /* ... or by nothing */
    bad(dec, &m, "truncated Update message: need 1 bytes at offset 10, have 0");
    m = insert_head(REL_T, 2);
    m.b[5] = '\0';
    bad(dec, &m, "unexpected tuple tag 0x00");
    pgo_free(dec);
}

static void test_corrupt_flags(void **state)
{
    PgoDecoder *dec = dec_with_t();
    const PgoRelation *rel = pgo_relation(dec, REL_T);
    uint32_t gen = rel->generation;
    Msg m = {.n = 0};
    (void)state;

    put8(&m, 'C');
    put8(&m, 1);
    put64(&m, 1);
    put64(&m, 2);
    put64(&m, 3);
    bad(dec, &m, "invalid Commit flags 0x01");
    m = relation_msg(REL_T, "public", 2);
    m.b[m.n - 2 * 4 - 3 - 1] = 2; /* flags of the last column "c2" */
    bad(dec, &m, "invalid flags 0x02 for column 2 of relation public.t");
    m = relation_msg(REL_T, "public", 2);
    m.b[1 + 4 + 7 + 2] = 'z';
    bad(dec, &m, "invalid replica identity 0x7a for relation public.t");
    m = relation_msg(REL_T, "public", 0);
    m.b[m.n - 2] = 0xff;
    m.b[m.n - 1] = 0xff;
    bad(dec, &m, "negative column count -1");
    m = relation_msg(REL_T, "public", 0);
    m.b[m.n - 1] = 200; /* 200 columns announced, none present */
    bad(dec, &m, "truncated Relation message: need 1 bytes at offset 17, have 0");
    /* failed Relation messages left the cached entry alone */
    assert_ptr_equal(pgo_relation(dec, REL_T), rel);
    assert_int_equal(rel->generation, gen);
    assert_int_equal(rel->ncols, 2);

    m.n = 0;
    put8(&m, 'T');
    put32(&m, 1);
    put8(&m, 4);
    put32(&m, REL_T);
    bad(dec, &m, "invalid Truncate options 0x04");
    m.b[5] = 3;
    m.b[1] = 0x80;
    bad(dec, &m, "negative relation count -2147483647");
    m.b[1] = 0x7f;
    bad(dec, &m, "truncated Truncate message: 2130706433 relation ids need");
    m.n = 0;
    put8(&m, 'M');
    put8(&m, 3);
    put64(&m, 1);
    putstr(&m, "p");
    put32(&m, 0);
    bad(dec, &m, "invalid Message flags 0x03");
    pgo_free(dec);
}

static void test_corrupt_strings(void **state)
{
    PgoDecoder *dec = dec_with_t();
    Msg m = {.n = 0};
    (void)state;

    put8(&m, 'O');
    put64(&m, 1);
    putraw(&m, "origin", 6);
    bad(dec, &m, "truncated Origin message: origin name string at offset 9 has no terminating NUL");
    m.n = 0;
    put8(&m, 'Y');
    put32(&m, 16400);
    putraw(&m, "public", 6);
    bad(dec, &m, "namespace string at offset 5 has no terminating NUL");
    m.n = 0;
    put8(&m, 'Y');
    put32(&m, 16400);
    putstr(&m, "public");
    putraw(&m, "mood", 4);
    bad(dec, &m, "type name string at offset 12 has no terminating NUL");
    m = relation_msg(REL_T, "public", 0);
    m.n = 1 + 4 + 7 + 1; /* cut inside the relation name */
    bad(dec, &m, "relation name string at offset 12 has no terminating NUL");
    m.n = 0;
    put8(&m, 'M');
    put8(&m, 0);
    put64(&m, 1);
    putraw(&m, "prefix", 6);
    bad(dec, &m, "prefix string at offset 10 has no terminating NUL");
    m = relation_msg(REL_T, "public", 1);
    m.n -= 9; /* column name "c1" without its NUL, then the end */
    bad(dec, &m, "column name string");
    pgo_free(dec);
}

static void test_unknown_relids(void **state)
{
    static const char kinds[] = {'I', 'U', 'D'};
    static const char *const names[] = {"Insert", "Update", "Delete"};
    PgoDecoder *dec = dec_with_t();
    Msg m;
    (void)state;

    for (size_t i = 0; i < 3; i++) {
        char want[128];
        m = insert_head(REL_T + 1, 2);
        m.b[0] = (unsigned char)kinds[i];
        snprintf(want, sizeof want,
                 "unknown relation id %u in %s message (no Relation message seen)", REL_T + 1,
                 names[i]);
        bad(dec, &m, want);
    }
    m.n = 0;
    put8(&m, 'T');
    put32(&m, 2);
    put8(&m, 0);
    put32(&m, REL_T);
    put32(&m, 99);
    bad(dec, &m, "unknown relation id 99 in Truncate message (no Relation message seen)");
    pgo_reset(dec);
    assert_null(pgo_relation(dec, REL_T));
    m = insert_head(REL_T, 2);
    put8(&m, 'n');
    put8(&m, 'n');
    bad(dec, &m, "unknown relation id 16384 in Insert message");
    pgo_free(dec);
}

/* ---- relation cache --------------------------------------------------- */

static void test_relation_replacement(void **state)
{
    PgoDecoder *dec = pgo_new();
    Msg r2 = relation_msg(REL_T, "public", 2), r3 = relation_msg(REL_T, "public", 3);
    Msg other = relation_msg(REL_T + 7, "", 0), ins2 = insert_head(REL_T, 2),
        ins3 = insert_head(REL_T, 3);
    const PgoRelation *rel;
    uint32_t g1, g2;
    PgoMsg out;
    (void)state;

    putraw(&ins2,
           "n"
           "t\0\0\0\2hi",
           8);
    putraw(&ins3, "nnt\0\0\0\3new", 10);
    rel = ok(dec, &r2, &out)->u.relation.rel;
    g1 = rel->generation;
    assert_int_equal(ok(dec, &ins2, &out)->u.change.new_tuple.natts, 2);
    assert_memory_equal(out.u.change.new_tuple.values[1].data, "hi", 2);
    bad(dec, &ins3, "has 3 columns, relation has 2");

    rel = ok(dec, &r3, &out)->u.relation.rel; /* ALTER TABLE ADD COLUMN */
    g2 = rel->generation;
    assert_true(g2 > g1);
    assert_int_equal(rel->ncols, 3);
    assert_string_equal(rel->colnames[2], "c3");
    assert_ptr_equal(pgo_relation(dec, REL_T), rel);
    bad(dec, &ins2, "has 2 columns, relation has 3");
    ok(dec, &ins3, &out);
    assert_ptr_equal(out.u.change.rel, rel);
    assert_int_equal(out.u.change.new_tuple.values[2].len, 3);
    assert_memory_equal(out.u.change.new_tuple.values[2].data, "new", 3);

    /* Generations are unique per decoder, also across relids and resets. */
    rel = ok(dec, &other, &out)->u.relation.rel;
    assert_true(rel->generation > g2);
    assert_string_equal(rel->nspname, "");
    assert_string_equal(rel->qualname, "pg_catalog.t"); /* "" means pg_catalog */
    assert_int_equal(rel->ncols, 0);
    g2 = rel->generation;
    pgo_reset(dec);
    rel = ok(dec, &r2, &out)->u.relation.rel;
    assert_true(rel->generation > g2);
    pgo_free(dec);
    pgo_free(NULL);
}

/* Many relids in scrambled order: each found, absent ones not. */
static void test_relation_cache_many(void **state)
{
    PgoDecoder *dec = pgo_new();
    PgoMsg out;
    (void)state;

    for (uint32_t i = 0; i < 500; i++) {
        Msg r = relation_msg((i * 7919u) % 1000u * 2u + 10u, "s", (uint16_t)(i % 4));
        ok(dec, &r, &out);
    }
    for (uint32_t i = 0; i < 500; i++) {
        uint32_t relid = (i * 7919u) % 1000u * 2u + 10u;
        const PgoRelation *rel = pgo_relation(dec, relid);
        assert_non_null(rel);
        assert_int_equal(rel->relid, relid);
        assert_int_equal(rel->ncols, i % 4);
        assert_null(pgo_relation(dec, relid + 1));
    }
    assert_null(pgo_relation(dec, 0));
    assert_null(pgo_relation(NULL, 10));
    pgo_free(dec);
}

/* Tuple arrays are decoder scratch, reused across messages. */
static void test_scratch_reuse(void **state)
{
    PgoDecoder *dec = dec_with_t();
    Msg ins = insert_head(REL_T, 2);
    const PgoValue *first;
    PgoMsg out;
    (void)state;

    putraw(&ins, "nu", 2);
    first = ok(dec, &ins, &out)->u.change.new_tuple.values;
    assert_int_equal(out.u.change.new_tuple.values[1].kind, PGO_VAL_UNCHANGED);
    assert_ptr_equal(ok(dec, &ins, &out)->u.change.new_tuple.values, first);
    pgo_free(dec);
}

/* ---- pseudo-random corruption ----------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static bool within(const void *p, size_t n, const char *buf, size_t len)
{
    const char *c = p;
    return c >= buf && (size_t)(c - buf) <= len && n <= len - (size_t)(c - buf);
}

static void check_tuple_bounds(const PgoTuple *t, const char *buf, size_t len)
{
    for (uint16_t i = 0; i < t->natts; i++) {
        const PgoValue *v = &t->values[i];
        if (v->kind == PGO_VAL_TEXT || v->kind == PGO_VAL_BINARY)
            assert_true(within(v->data, v->len, buf, len));
        else
            assert_true(v->len == 0 && v->data == NULL);
    }
}

/* A successful decode must only point inside the input buffer. */
static void check_bounds(const PgoDecoder *dec, const PgoMsg *m, const char *buf, size_t len)
{
    switch (m->kind) {
    case PGO_ORIGIN:
        assert_true(within(m->u.origin.name, strlen(m->u.origin.name) + 1, buf, len));
        break;
    case PGO_TYPE:
        assert_true(within(m->u.type.nspname, strlen(m->u.type.nspname) + 1, buf, len));
        assert_true(within(m->u.type.typname, strlen(m->u.type.typname) + 1, buf, len));
        break;
    case PGO_INSERT:
    case PGO_UPDATE:
    case PGO_DELETE:
        assert_ptr_equal(pgo_relation(dec, m->u.change.rel->relid), m->u.change.rel);
        assert_int_equal(m->u.change.new_tuple.natts,
                         m->kind == PGO_DELETE ? 0 : m->u.change.rel->ncols);
        check_tuple_bounds(&m->u.change.new_tuple, buf, len);
        if (m->u.change.old_kind != 0)
            check_tuple_bounds(&m->u.change.old_tuple, buf, len);
        break;
    case PGO_TRUNCATE:
        for (uint32_t i = 0; i < m->u.truncate.nrels; i++)
            assert_non_null(m->u.truncate.rels[i]);
        break;
    case PGO_MESSAGE:
        assert_true(within(m->u.message.prefix, strlen(m->u.message.prefix) + 1, buf, len));
        assert_true(within(m->u.message.content, m->u.message.len, buf, len));
        break;
    default:
        break;
    }
}

static void test_byte_flips(void **state)
{
    Fixture fx[NSCENARIOS * NVARIANTS];
    PgoDecoder *dec[NSCENARIOS * NVARIANTS];
    size_t nfx = NSCENARIOS * NVARIANTS, decoded = 0;
    uint64_t seed = UINT64_C(0x9e3779b97f4a7c15);
    PgoMsg m;
    (void)state;

    for (size_t i = 0; i < nfx; i++) { /* one primed decoder per fixture file */
        fx[i] = fixture_load(scenarios[i / NVARIANTS], variants[i % NVARIANTS]);
        dec[i] = pgo_new();
        for (size_t j = 0; j < fx[i].n; j++)
            assert_int_equal(pgo_decode(dec[i], fx[i].msgs[j], fx[i].lens[j], &m), 0);
    }
    for (int iter = 0; iter < 20000; iter++) {
        size_t f = rng_next(&seed) % nfx, j = rng_next(&seed) % fx[f].n;
        size_t len = fx[f].lens[j], flips = 1 + rng_next(&seed) % 4;
        char *buf = malloc(len);
        int rc;

        assert_non_null(buf);
        memcpy(buf, fx[f].msgs[j], len);
        for (size_t k = 0; k < flips; k++) /* bias towards headers and lengths */
            buf[rng_next(&seed) % (k == 0 && len > 24 ? 24 : len)] ^=
                (char)(1 + rng_next(&seed) % 255);
        if (rng_next(&seed) % 8 == 0)
            len = rng_next(&seed) % (len + 1);
        rc = pgo_decode(dec[f], buf, len, &m);
        assert_true(rc == 0 || rc == -1);
        if (rc == -1) {
            assert_true(pgo_errstr(dec[f])[0] != '\0');
        } else {
            assert_string_equal(pgo_errstr(dec[f]), "");
            check_bounds(dec[f], &m, buf, len);
            decoded++;
        }
        free(buf);
    }
    assert_true(decoded > 0); /* some flips hit value bytes and still decode */
    for (size_t i = 0; i < nfx; i++) {
        pgo_free(dec[i]);
        fixture_free(&fx[i]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_insert),
        cmocka_unit_test(test_update),
        cmocka_unit_test(test_delete),
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_toast),
        cmocka_unit_test(test_truncate),
        cmocka_unit_test(test_message),
        cmocka_unit_test(test_origin),
        cmocka_unit_test(test_alter),
        cmocka_unit_test(test_truncated_prefixes),
        cmocka_unit_test(test_trailing_bytes),
        cmocka_unit_test(test_exact_errors),
        cmocka_unit_test(test_corrupt_lengths),
        cmocka_unit_test(test_corrupt_tuples),
        cmocka_unit_test(test_corrupt_flags),
        cmocka_unit_test(test_corrupt_strings),
        cmocka_unit_test(test_unknown_relids),
        cmocka_unit_test(test_relation_replacement),
        cmocka_unit_test(test_relation_cache_many),
        cmocka_unit_test(test_scratch_reuse),
        cmocka_unit_test(test_byte_flips),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
