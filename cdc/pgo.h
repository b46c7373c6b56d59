/*
 * pgo.h — decoder for PostgreSQL's pgoutput logical replication protocol.
 *
 * Like hiredis' reader, the decoder does no I/O: feed it the payload of one
 * XLogData message (the bytes after the 25-byte 'w' header) and it returns
 * the decoded message. Every read is bounds-checked; malformed, truncated or
 * oversized input yields -1 and a message in dec->errstr, never an
 * out-of-bounds read. It never logs and never exits.
 *
 * Protocol versions 1 and 2 without streaming are supported (streaming is
 * never requested, so no message carries an xid prefix). Messages: Begin,
 * Commit, Origin, Relation, Type, Insert, Update (with 'K' or 'O' old tuple),
 * Delete, Truncate, logical decoding Message.
 *
 * The decoder keeps a relation cache keyed by relid; a Relation message
 * replaces the cached entry (ALTER TABLE mid-stream). Insert/Update/Delete
 * for a relid not in the cache is an error.
 *
 * Memory: tuple value arrays are scratch storage owned by the decoder and
 * reused (no per-change allocation). Value bytes point into the input
 * buffer. Everything in a PgoMsg is valid until the next pgo_decode() call
 * on the same decoder or until the input buffer is released, whichever comes
 * first — except PgoRelation pointers, which stay valid until a Relation
 * message for the same relid arrives or the decoder is freed.
 */
#ifndef WALBUST_PGO_H
#define WALBUST_PGO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum PgoKind {
    PGO_BEGIN = 'B',
    PGO_COMMIT = 'C',
    PGO_ORIGIN = 'O',
    PGO_RELATION = 'R',
    PGO_TYPE = 'Y',
    PGO_INSERT = 'I',
    PGO_UPDATE = 'U',
    PGO_DELETE = 'D',
    PGO_TRUNCATE = 'T',
    PGO_MESSAGE = 'M',
} PgoKind;

/* Kind of one column value in a TupleData, as on the wire. */
typedef enum PgoValueKind {
    PGO_VAL_NULL = 'n',
    PGO_VAL_UNCHANGED = 'u', /* unchanged TOASTed value, not sent */
    PGO_VAL_TEXT = 't',
    PGO_VAL_BINARY = 'b',
} PgoValueKind;

typedef struct PgoValue {
    char kind;        /* a PgoValueKind */
    uint32_t len;     /* bytes at data, for TEXT and BINARY; else 0 */
    const char *data; /* borrowed from the input buffer; NOT NUL-terminated */
} PgoValue;

typedef struct PgoTuple {
    uint16_t natts;
    PgoValue *values; /* natts entries; decoder scratch */
} PgoTuple;

typedef struct PgoColumn {
    char *name;       /* owned by the relation */
    uint32_t type_oid;
    int32_t typmod;
    bool key;         /* part of the replica identity (flag 1) */
} PgoColumn;

typedef struct PgoRelation {
    uint32_t relid;
    char *nspname;
    char *relname;
    char *qualname;   /* "nspname.relname", unquoted */
    char replident;   /* 'd' default, 'n' nothing, 'f' full, 'i' index */
    uint16_t ncols;
    PgoColumn *cols;
    const char **colnames; /* ncols entries, aliases of cols[i].name */
    uint32_t generation;   /* bumped each time this relid is replaced */
} PgoRelation;

#define PGO_TRUNCATE_CASCADE 1
#define PGO_TRUNCATE_RESTART_IDENTITY 2

typedef struct PgoMsg {
    PgoKind kind;
    union {
        struct {
            uint64_t final_lsn;  /* LSN of the commit record */
            int64_t commit_time; /* µs since 2000-01-01 UTC */
            uint32_t xid;
        } begin;
        struct {
            uint8_t flags;
            uint64_t commit_lsn;
            uint64_t end_lsn;    /* end of the commit record: confirm this */
            int64_t commit_time;
        } commit;
        struct {
            uint64_t lsn;
            const char *name;    /* borrowed, NUL-terminated in the input */
        } origin;
        struct {
            const PgoRelation *rel;
        } relation;
        struct {
            uint32_t oid;
            const char *nspname; /* borrowed */
            const char *typname; /* borrowed */
        } type;
        struct {
            const PgoRelation *rel;
            char old_kind;       /* 'K' (identity columns only), 'O' (full), 0 */
            PgoTuple old_tuple;  /* valid when old_kind != 0 */
            PgoTuple new_tuple;  /* valid for insert and update */
        } change;                /* PGO_INSERT, PGO_UPDATE, PGO_DELETE */
        struct {
            uint8_t options;     /* PGO_TRUNCATE_* bits */
            uint32_t nrels;
            const PgoRelation **rels; /* nrels entries; decoder scratch */
        } truncate;
        struct {
            bool transactional;
            uint64_t lsn;
            const char *prefix;  /* borrowed, NUL-terminated */
            uint32_t len;
            const char *content; /* borrowed, NOT NUL-terminated */
        } message;
    } u;
} PgoMsg;

typedef struct PgoDecoder PgoDecoder;

/* Allocate a decoder with an empty relation cache. Aborts when out of memory;
 * never returns NULL. Free with pgo_free(). */
PgoDecoder *pgo_new(void);

/* Free the decoder and its relation cache. Accepts NULL. */
void pgo_free(PgoDecoder *dec);

/* Decode one pgoutput message of len bytes at buf into *out.
 * Returns 0 on success, -1 on malformed input with pgo_errstr() set
 * (e.g. "truncated Insert message: need 4 bytes at offset 9, have 2").
 * Trailing bytes after a complete message are an error. */
int pgo_decode(PgoDecoder *dec, const char *buf, size_t len, PgoMsg *out)
    __attribute__((warn_unused_result));

/* The last error's text; "" when none. Valid until the next call. */
const char *pgo_errstr(const PgoDecoder *dec);

/* The cached relation with this relid, or NULL. */
const PgoRelation *pgo_relation(const PgoDecoder *dec, uint32_t relid);

/* Forget every cached relation (e.g. before re-streaming on a new
 * connection, where the server resends Relation messages). */
void pgo_reset(PgoDecoder *dec);

#endif
