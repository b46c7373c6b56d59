/*
 * pgo.c — decoder for PostgreSQL's pgoutput logical replication protocol
 * (see pgo.h for the contract).
 *
 * One reader function per message type mirrors the wire format of the
 * PostgreSQL 15 "Logical Replication Message Formats" field by field, the way
 * src/backend/replication/logical/proto.c writes it. Every field goes through
 * a bounds-checked Reader: a length is always compared against the bytes that
 * remain (never pointer + length), so hostile lengths such as 0x7fffffff
 * cannot overflow. The relation cache is a sorted array of owned
 * PgoRelation pointers searched by binary search; tuple value arrays and the
 * Truncate relation list are scratch arrays that grow and are then reused.
 */
#include "pgo.h"
#include "mem.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PGO_ERRSTR_SIZE 256

typedef struct PgoScratch {
    PgoValue *vals;
    size_t cap;
} PgoScratch;

struct PgoDecoder {
    PgoRelation **rels; /* sorted by relid, owned */
    size_t nrels;
    size_t rels_cap;
    uint32_t generation; /* last generation handed out; unique per decoder */
    PgoScratch old_vals;
    PgoScratch new_vals;
    const PgoRelation **trunc_rels;
    size_t trunc_cap;
    char errstr[PGO_ERRSTR_SIZE];
};

/* A cursor over one message. `what` names the message type for errors. */
typedef struct Reader {
    PgoDecoder *dec;
    const unsigned char *buf;
    size_t len;
    size_t off;
    const char *what;
} Reader;

/* ---- errors and reading ---------------------------------------------- */

/* Errors are rare: kept out of line (cold) so the readers below inline. */
static int fail(PgoDecoder *dec, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), cold, noinline));

static int fail(PgoDecoder *dec, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dec->errstr, sizeof dec->errstr, fmt, ap);
    va_end(ap);
    return -1;
}

static size_t rd_left(const Reader *r)
{
    return r->len - r->off;
}

static int rd_short(Reader *r, size_t n) __attribute__((cold, noinline));

static int rd_short(Reader *r, size_t n)
{
    return fail(r->dec, "truncated %s message: need %zu bytes at offset %zu, have %zu", r->what, n,
                r->off, rd_left(r));
}

/* Check that n more bytes are present. */
static inline int rd_need(Reader *r, size_t n)
{
    if (__builtin_expect(rd_left(r) < n, 0))
        return rd_short(r, n);
    return 0;
}

static inline int rd_u8(Reader *r, uint8_t *out)
{
    if (rd_need(r, 1) < 0)
        return -1;
    *out = r->buf[r->off++];
    return 0;
}

static inline int rd_u16(Reader *r, uint16_t *out)
{
    if (rd_need(r, 2) < 0)
        return -1;
    *out = (uint16_t)((unsigned)r->buf[r->off] << 8 | r->buf[r->off + 1]);
    r->off += 2;
    return 0;
}

static inline int rd_u32(Reader *r, uint32_t *out)
{
    const unsigned char *p;
    if (rd_need(r, 4) < 0)
        return -1;
    p = r->buf + r->off;
    *out = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    r->off += 4;
    return 0;
}

static inline int rd_u64(Reader *r, uint64_t *out)
{
    uint32_t hi, lo;
    if (rd_need(r, 8) < 0 || rd_u32(r, &hi) < 0 || rd_u32(r, &lo) < 0)
        return -1;
    *out = (uint64_t)hi << 32 | lo;
    return 0;
}

/* Two's complement without implementation-defined conversions. */
static int64_t as_i64(uint64_t v)
{
    return v <= INT64_MAX ? (int64_t)v : -(int64_t)(UINT64_MAX - v) - 1;
}

static int32_t as_i32(uint32_t v)
{
    return v <= INT32_MAX ? (int32_t)v : -(int32_t)(UINT32_MAX - v) - 1;
}

/* A NUL-terminated string; the NUL must lie inside the message. */
static int rd_str(Reader *r, const char *field, const char **out)
{
    const unsigned char *start = r->buf + r->off;
    const unsigned char *nul = memchr(start, '\0', rd_left(r));
    if (nul == NULL)
        return fail(r->dec, "truncated %s message: %s string at offset %zu has no terminating NUL",
                    r->what, field, r->off);
    *out = (const char *)start;
    r->off += (size_t)(nul - start) + 1;
    return 0;
}

/* An Int32 length followed by that many bytes. */
static inline int rd_bytes(Reader *r, const char *field, uint32_t *len, const char **data)
{
    uint32_t raw;
    int32_t n;
    size_t at = r->off;

    if (rd_u32(r, &raw) < 0)
        return -1;
    n = as_i32(raw);
    if (n < 0)
        return fail(r->dec, "negative %s length %d at offset %zu in %s message", field, n, at,
                    r->what);
    if ((size_t)raw > rd_left(r))
        return fail(r->dec, "%s length %u at offset %zu exceeds the %zu bytes left in %s message",
                    field, raw, at, rd_left(r), r->what);
    *len = raw;
    *data = (const char *)r->buf + r->off;
    r->off += raw;
    return 0;
}

static int rd_end(Reader *r)
{
    if (rd_left(r) != 0)
        return fail(r->dec, "%zu trailing bytes after %s message at offset %zu", rd_left(r),
                    r->what, r->off);
    return 0;
}

/* ---- relation cache --------------------------------------------------- */

static void rel_free(PgoRelation *rel)
{
    if (rel == NULL)
        return;
    for (uint16_t i = 0; i < rel->ncols; i++)
        free(rel->cols[i].name);
    free(rel->cols);
    free(rel->colnames);
    free(rel->nspname);
    free(rel->relname);
    free(rel->qualname);
    free(rel);
}

/* Index of relid in the sorted cache, or where it would be inserted. */
static size_t cache_find(const PgoDecoder *dec, uint32_t relid, bool *found)
{
    size_t lo = 0, hi = dec->nrels;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (dec->rels[mid]->relid < relid)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = lo < dec->nrels && dec->rels[lo]->relid == relid;
    return lo;
}

/* Put rel in the cache, freeing any entry with the same relid. */
static void cache_store(PgoDecoder *dec, PgoRelation *rel)
{
    bool found;
    size_t i = cache_find(dec, rel->relid, &found);

    rel->generation = ++dec->generation;
    if (found) {
        rel_free(dec->rels[i]);
        dec->rels[i] = rel;
        return;
    }
    dec->rels = xgrow(dec->rels, &dec->rels_cap, dec->nrels + 1, sizeof *dec->rels);
    memmove(dec->rels + i + 1, dec->rels + i, (dec->nrels - i) * sizeof *dec->rels);
    dec->rels[i] = rel;
    dec->nrels++;
}

const PgoRelation *pgo_relation(const PgoDecoder *dec, uint32_t relid)
{
    bool found;
    size_t i;

    if (dec == NULL)
        return NULL;
    i = cache_find(dec, relid, &found);
    return found ? dec->rels[i] : NULL;
}

static int rd_relid(Reader *r, const PgoRelation **out)
{
    uint32_t relid;
    if (rd_u32(r, &relid) < 0)
        return -1;
    *out = pgo_relation(r->dec, relid);
    if (*out == NULL)
        return fail(r->dec, "unknown relation id %u in %s message (no Relation message seen)",
                    relid, r->what);
    return 0;
}

/* ---- transaction framing ---------------------------------------------- */

static int read_begin(Reader *r, PgoMsg *out)
{
    uint64_t t;
    if (rd_u64(r, &out->u.begin.final_lsn) < 0 || rd_u64(r, &t) < 0 ||
        rd_u32(r, &out->u.begin.xid) < 0)
        return -1;
    out->u.begin.commit_time = as_i64(t);
    return rd_end(r);
}

static int read_commit(Reader *r, PgoMsg *out)
{
    uint64_t t;
    if (rd_u8(r, &out->u.commit.flags) < 0)
        return -1;
    if (out->u.commit.flags != 0)
        return fail(r->dec, "invalid Commit flags 0x%02x (expected 0)", out->u.commit.flags);
    if (rd_u64(r, &out->u.commit.commit_lsn) < 0 || rd_u64(r, &out->u.commit.end_lsn) < 0 ||
        rd_u64(r, &t) < 0)
        return -1;
    out->u.commit.commit_time = as_i64(t);
    return rd_end(r);
}

static int read_origin(Reader *r, PgoMsg *out)
{
    if (rd_u64(r, &out->u.origin.lsn) < 0 || rd_str(r, "origin name", &out->u.origin.name) < 0)
        return -1;
    return rd_end(r);
}

static int read_type(Reader *r, PgoMsg *out)
{
    if (rd_u32(r, &out->u.type.oid) < 0 || rd_str(r, "namespace", &out->u.type.nspname) < 0 ||
        rd_str(r, "type name", &out->u.type.typname) < 0)
        return -1;
    return rd_end(r);
}

/* ---- Relation --------------------------------------------------------- */

static char *make_qualname(const char *nspname, const char *relname)
{
    /* An empty namespace on the wire means pg_catalog. */
    const char *nsp = nspname[0] != '\0' ? nspname : "pg_catalog";
    size_t n = strlen(nsp) + 1 + strlen(relname) + 1;
    char *q = xrealloc(NULL, n);
    snprintf(q, n, "%s.%s", nsp, relname);
    return q;
}

static bool valid_replident(uint8_t c)
{
    return c == 'd' || c == 'n' || c == 'f' || c == 'i';
}

/* Read rel->ncols column descriptions into rel->cols (already allocated). */
static int read_columns(Reader *r, PgoRelation *rel)
{
    for (uint16_t i = 0; i < rel->ncols; i++) {
        PgoColumn *col = &rel->cols[i];
        const char *name;
        uint8_t flags;
        uint32_t typmod;

        if (rd_u8(r, &flags) < 0)
            return -1;
        if (flags & ~1u)
            return fail(r->dec,
                        "invalid flags 0x%02x for column %u of relation %s in Relation message",
                        flags, i + 1, rel->qualname);
        if (rd_str(r, "column name", &name) < 0 || rd_u32(r, &col->type_oid) < 0 ||
            rd_u32(r, &typmod) < 0)
            return -1;
        col->name = xstrdup(name);
        col->typmod = as_i32(typmod);
        col->key = flags == 1;
        rel->colnames[i] = col->name;
    }
    return 0;
}

static int read_relation(Reader *r, PgoMsg *out)
{
    PgoRelation *rel = xcalloc(1, sizeof *rel);
    const char *nsp, *name;
    uint8_t ident;
    uint16_t ncols;

    if (rd_u32(r, &rel->relid) < 0 || rd_str(r, "namespace", &nsp) < 0 ||
        rd_str(r, "relation name", &name) < 0 || rd_u8(r, &ident) < 0)
        goto fail;
    rel->nspname = xstrdup(nsp);
    rel->relname = xstrdup(name);
    rel->qualname = make_qualname(nsp, name);
    if (!valid_replident(ident)) {
        fail(r->dec, "invalid replica identity 0x%02x for relation %s in Relation message", ident,
             rel->qualname);
        goto fail;
    }
    rel->replident = (char)ident;
    if (rd_u16(r, &ncols) < 0)
        goto fail;
    if (ncols > INT16_MAX) {
        fail(r->dec, "negative column count %d for relation %s in Relation message",
             (int)ncols - 65536, rel->qualname);
        goto fail;
    }
    rel->cols = xcalloc(ncols, sizeof *rel->cols);
    rel->colnames = xcalloc(ncols, sizeof *rel->colnames);
    rel->ncols = ncols; /* columns not read yet have name NULL: rel_free copes */
    if (read_columns(r, rel) < 0 || rd_end(r) < 0)
        goto fail;
    cache_store(r->dec, rel);
    out->u.relation.rel = rel;
    return 0;

fail:
    rel_free(rel);
    return -1;
}

/* ---- row changes ------------------------------------------------------ */

/* One column of a TupleData into *v. */
static int read_value(Reader *r, uint16_t col, PgoValue *v)
{
    uint8_t kind;
    size_t at = r->off;

    if (rd_u8(r, &kind) < 0)
        return -1;
    v->kind = (char)kind;
    v->len = 0;
    v->data = NULL;
    switch (kind) {
    case PGO_VAL_NULL:
    case PGO_VAL_UNCHANGED:
        return 0;
    case PGO_VAL_TEXT:
    case PGO_VAL_BINARY:
        return rd_bytes(r, "column value", &v->len, &v->data);
    default:
        return fail(r->dec,
                    "unknown tuple value kind 0x%02x for column %u at offset %zu in %s message",
                    kind, col + 1, at, r->what);
    }
}

/* A TupleData for rel into the scratch array s; tup->values points at it. */
static int read_tuple(Reader *r, const PgoRelation *rel, PgoScratch *s, PgoTuple *tup)
{
    uint16_t natts;

    if (rd_u16(r, &natts) < 0)
        return -1;
    if (natts != rel->ncols)
        return fail(r->dec, "%s message for relation %s has %u columns, relation has %u", r->what,
                    rel->qualname, natts, rel->ncols);
    s->vals = xgrow(s->vals, &s->cap, natts, sizeof *s->vals);
    for (uint16_t i = 0; i < natts; i++) {
        if (read_value(r, i, &s->vals[i]) < 0)
            return -1;
    }
    tup->natts = natts;
    tup->values = s->vals;
    return 0;
}

/* The Byte1 that introduces a TupleData ('N', 'K' or 'O'). */
static int rd_tag(Reader *r, const char *allowed, uint8_t *tag)
{
    size_t at = r->off;
    if (rd_u8(r, tag) < 0)
        return -1;
    if (*tag == 0 || strchr(allowed, *tag) == NULL)
        return fail(r->dec, "unexpected tuple tag 0x%02x at offset %zu in %s message", *tag, at,
                    r->what);
    return 0;
}

static int read_insert(Reader *r, PgoMsg *out)
{
    uint8_t tag;
    if (rd_relid(r, &out->u.change.rel) < 0 || rd_tag(r, "N", &tag) < 0 ||
        read_tuple(r, out->u.change.rel, &r->dec->new_vals, &out->u.change.new_tuple) < 0)
        return -1;
    return rd_end(r);
}

static int read_update(Reader *r, PgoMsg *out)
{
    PgoDecoder *dec = r->dec;
    uint8_t tag;

    if (rd_relid(r, &out->u.change.rel) < 0 || rd_tag(r, "KON", &tag) < 0)
        return -1;
    if (tag != 'N') {
        out->u.change.old_kind = (char)tag;
        if (read_tuple(r, out->u.change.rel, &dec->old_vals, &out->u.change.old_tuple) < 0 ||
            rd_tag(r, "N", &tag) < 0)
            return -1;
    }
    if (read_tuple(r, out->u.change.rel, &dec->new_vals, &out->u.change.new_tuple) < 0)
        return -1;
    return rd_end(r);
}

static int read_delete(Reader *r, PgoMsg *out)
{
    uint8_t tag;
    if (rd_relid(r, &out->u.change.rel) < 0 || rd_tag(r, "KO", &tag) < 0)
        return -1;
    out->u.change.old_kind = (char)tag;
    if (read_tuple(r, out->u.change.rel, &r->dec->old_vals, &out->u.change.old_tuple) < 0)
        return -1;
    return rd_end(r);
}

static int read_truncate(Reader *r, PgoMsg *out)
{
    PgoDecoder *dec = r->dec;
    uint32_t nrels;

    if (rd_u32(r, &nrels) < 0 || rd_u8(r, &out->u.truncate.options) < 0)
        return -1;
    if (as_i32(nrels) < 0)
        return fail(dec, "negative relation count %d in Truncate message", as_i32(nrels));
    if (out->u.truncate.options & ~(PGO_TRUNCATE_CASCADE | PGO_TRUNCATE_RESTART_IDENTITY))
        return fail(dec, "invalid Truncate options 0x%02x", out->u.truncate.options);
    /* Check the count against the bytes left before allocating for it. */
    if (nrels > rd_left(r) / 4)
        return fail(
            dec,
            "truncated Truncate message: %u relation ids need %zu bytes at offset %zu, have %zu",
            nrels, (size_t)nrels * 4, r->off, rd_left(r));
    dec->trunc_rels = xgrow(dec->trunc_rels, &dec->trunc_cap, nrels, sizeof *dec->trunc_rels);
    for (uint32_t i = 0; i < nrels; i++) {
        if (rd_relid(r, &dec->trunc_rels[i]) < 0)
            return -1;
    }
    out->u.truncate.nrels = nrels;
    out->u.truncate.rels = dec->trunc_rels;
    return rd_end(r);
}

static int read_message(Reader *r, PgoMsg *out)
{
    uint8_t flags;
    if (rd_u8(r, &flags) < 0)
        return -1;
    if (flags & ~1u)
        return fail(r->dec, "invalid Message flags 0x%02x", flags);
    out->u.message.transactional = flags == 1;
    if (rd_u64(r, &out->u.message.lsn) < 0 || rd_str(r, "prefix", &out->u.message.prefix) < 0 ||
        rd_bytes(r, "content", &out->u.message.len, &out->u.message.content) < 0)
        return -1;
    return rd_end(r);
}

/* ---- dispatch --------------------------------------------------------- */

typedef struct MsgType {
    PgoKind kind;
    const char *name;
    int (*read)(Reader *r, PgoMsg *out);
} MsgType;

/* The most frequent first: every message is looked up here. */
static const MsgType msg_types[] = {
    {PGO_BEGIN, "Begin", read_begin},
    {PGO_COMMIT, "Commit", read_commit},
    {PGO_UPDATE, "Update", read_update},
    {PGO_INSERT, "Insert", read_insert},
    {PGO_DELETE, "Delete", read_delete},
    {PGO_RELATION, "Relation", read_relation},
    {PGO_MESSAGE, "Message", read_message},
    {PGO_TRUNCATE, "Truncate", read_truncate},
    {PGO_TYPE, "Type", read_type},
    {PGO_ORIGIN, "Origin", read_origin},
};

int pgo_decode(PgoDecoder *dec, const char *buf, size_t len, PgoMsg *out)
{
    Reader r = {.dec = dec, .buf = (const unsigned char *)buf, .len = len, .off = 1};
    unsigned char type;

    dec->errstr[0] = '\0';
    memset(out, 0, sizeof *out);
    if (buf == NULL || len == 0)
        return fail(dec, "empty pgoutput message");
    type = r.buf[0];
    for (size_t i = 0; i < sizeof msg_types / sizeof msg_types[0]; i++) {
        if ((unsigned char)msg_types[i].kind == type) {
            r.what = msg_types[i].name;
            out->kind = msg_types[i].kind;
            return msg_types[i].read(&r, out);
        }
    }
    if (type >= 0x20 && type < 0x7f)
        return fail(dec, "unknown pgoutput message type '%c' (0x%02x)", type, type);
    return fail(dec, "unknown pgoutput message type 0x%02x", type);
}

/* ---- lifecycle -------------------------------------------------------- */

PgoDecoder *pgo_new(void)
{
    return xcalloc(1, sizeof(PgoDecoder));
}

void pgo_reset(PgoDecoder *dec)
{
    if (dec == NULL)
        return;
    for (size_t i = 0; i < dec->nrels; i++)
        rel_free(dec->rels[i]);
    dec->nrels = 0;
    /* dec->generation keeps counting so generations stay unique. */
}

void pgo_free(PgoDecoder *dec)
{
    if (dec == NULL)
        return;
    pgo_reset(dec);
    free(dec->rels);
    free(dec->old_vals.vals);
    free(dec->new_vals.vals);
    free(dec->trunc_rels);
    free(dec);
}

const char *pgo_errstr(const PgoDecoder *dec)
{
    return dec != NULL ? dec->errstr : "";
}
