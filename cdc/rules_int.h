/*
 * rules_int.h — internals shared by rules.c (loading), rules_eval.c
 * (evaluation and catalog checks) and rules_audit.c (audit keys). Not part
 * of the rules API: include only from those files.
 *
 * A loaded Rules holds compiled rules (templates split into literal and
 * placeholder segments), an index from table name to rules, the interned
 * publish channels, and scratch memory that rules_eval() reuses.
 */
#ifndef WALBUST_RULES_INT_H
#define WALBUST_RULES_INT_H

#include "rules.h"
#include "mem.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct Buf {
    char *data;
    size_t len, cap;
} Buf;

static inline void buf_put(Buf *b, const char *s, size_t n)
{
    b->data = xgrow(b->data, &b->cap, b->len + n + 1, 1);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static inline void buf_puts(Buf *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

static inline void buf_put_escaped(Buf *b, const char *s, size_t n)
{
    b->data = xgrow(b->data, &b->cap, b->len + 2 * n + 1, 1);
    b->len += rules_glob_escape(s, n, b->data + b->len);
}

/* ---- compiled rules -------------------------------------------------------- */
enum { TPL_KEY, TPL_PATTERN, TPL_TAG, TPL_VERSION, TPL_NKINDS };
/* Render kinds beyond the template arrays: refresh and stale keys. */
enum { TPL_REFRESH = TPL_NKINDS, TPL_STALE };

#define ALL_OPS (RULES_INSERT | RULES_UPDATE | RULES_DELETE | RULES_TRUNCATE)
#define ROW_OPS (RULES_INSERT | RULES_UPDATE | RULES_DELETE)

typedef enum SegKind { SEG_LIT, SEG_ANY, SEG_OLD, SEG_NEW } SegKind;

/* Which images a template's placeholders use. */
#define USES_ANY (1u << SEG_ANY)
#define USES_OLD (1u << SEG_OLD)
#define USES_NEW (1u << SEG_NEW)

typedef struct Seg {
    SegKind kind;
    char *text; /* literal bytes (braces unescaped), or the column name */
    size_t len;
    size_t col; /* placeholders: index into Rule.cols */
} Seg;

/* Where a value sits in the rules file. */
typedef struct SrcLoc {
    int line, column;
    char *path;
} SrcLoc;

typedef struct Template {
    char *src; /* as written */
    Seg *segs;
    size_t nsegs, nph; /* segments, placeholders among them */
    unsigned uses;     /* USES_* */
    SrcLoc loc;
} Template;

/* Column resolution for the relation shape last seen (see file comment). */
typedef struct ColCache {
    bool valid;
    const char *const *names;
    size_t ncols;
    uint32_t shape; /* RulesChange.shape it was resolved for (0: none) */
    long *idx;      /* per Rule.cols entry: the change's column index or -1 */
} ColCache;

/* A rule's lookup (docs/rules.md "Lookups"): a read-only query whose
 * result rows feed the rule's templates. */
typedef struct Lookup {
    char *sql;      /* as written, trailing whitespace and ';' removed */
    Template *args; /* rendered from the changed row only */
    size_t nargs;
    size_t args_written; /* entries in "args" as written (some may be bad) */
    size_t limit; /* more result rows than this: widen */
    SrcLoc loc, sql_loc;
} Lookup;

/* A rule's refresh entry (docs/rules.md "Refresh"): write the new row. */
typedef struct Refresh {
    Template key;
    long ttl;  /* seconds; 0: no expiry */
    bool hash; /* "format": "hash" (else "json") */
} Refresh;

/* A rule's audit declaration (docs/audit.md): how a cached value relates
 * to the database. The key template and the argument templates have their
 * own placeholder names (Audit.names), read back from a key, not from a
 * changed row: every argument placeholder also appears in the key. */
typedef struct Audit {
    Template key;
    Lookup q;     /* sql and args (args_written, loc as for lookups) */
    bool json;    /* "compare": "json" (else "exact") */
    char **names; /* placeholder names of key and args */
    size_t nnames;
} Audit;

#define STALE_DEFAULT_GRACE 30 /* seconds a stale value is served */

typedef struct Rule {
    char *table;
    unsigned on;               /* RulesOp bits */
    size_t *changed, nchanged; /* indexes into cols */
    SrcLoc *changed_loc;
    Template *tpl[TPL_NKINDS];
    size_t ntpl[TPL_NKINDS];
    size_t *channels, nchannels; /* indexes into Rules.channels */
    char **cols;                 /* distinct column names referenced */
    size_t ncols;
    SrcLoc loc, table_loc;
    ColCache *cache;  /* mutable even through a const Rules */
    Lookup *lookup;   /* NULL: none */
    Refresh *refresh; /* "refresh" entries */
    size_t nrefresh;
    Template *stale; /* "stale" key templates */
    size_t nstale;
    long stale_grace; /* seconds */
    SrcLoc grace_loc; /* of "stale_grace" (path NULL: not written) */
    Audit *audit;     /* NULL: none */
} Rule;

/* At most this many distinct `changed` columns per table take the
 * bitmask path (TableEnt.chmask); a table naming more filters rule by rule. */
#define CHANGED_MASK_MAX 64
#define TABLE_ON_LOOKUP 0x80u /* TableEnt.ons: the rule has a lookup */
#define TABLE_ON_FILTER 0x40u /* ... a `changed` filter */

typedef struct TableEnt {
    char *name;
    size_t *rules, nrules;
    /* The `changed` filters of its rules as bitmasks over the distinct
     * columns they name (chcols: the rules' own strings), so that an
     * update's changed columns are found once and each rule's filter is
     * one AND (rules_eval). chmask is per entry of rules (0: no filter);
     * NULL when the table names more than CHANGED_MASK_MAX columns. */
    char **chcols;
    size_t nchcols;
    uint64_t *chmask;
    /* With chmask, the update candidates as bitmaps over the entries of
     * rules, nwords words each: unfiltered, the rules without a filter;
     * colrules + j * nwords, the rules naming chcols[j]. An update looks
     * only at unfiltered | the rows of its changed (or lacking) columns,
     * so rules whose filter cannot pass cost nothing (rules_eval). */
    uint64_t *unfiltered, *colrules;
    size_t nwords;
    /* Per entry of rules: the rule's RulesOp bits, TABLE_ON_LOOKUP and
     * TABLE_ON_FILTER, side by side so that the rules that do not fire
     * are passed over without touching their Rule. */
    unsigned char *ons;
    ColCache *chcache; /* chcols → the change's column indexes */
} TableEnt;

/* One rendered invalidation waiting in the scratch area. */
typedef struct Item {
    RulesInvAction action;
    unsigned phase; /* 0 keys, 1 patterns, 2 tags, 3 versions */
    size_t rule;    /* index into Rules.rules */
    size_t off, len;
    size_t skip; /* bytes of tag prefix at the start (left out of payloads) */
    bool widened;
    size_t aux; /* RULES_INV_REFRESH: the rule's refresh entry */
} Item;

typedef struct Slot {
    unsigned gen;
    size_t item;
} Slot;

/* A table rules_eval() found, by the address of the change's name. */
#define RULES_RECENT_TABLES 16

typedef struct RecentTable {
    const char *name;
    const TableEnt *te;
} RecentTable;

/* Per-eval working memory, reused across calls. */
typedef struct Scratch {
    Buf strs; /* rendered strings, each NUL-terminated */
    Item *items;
    size_t nitems, itemcap;
    Slot *set; /* open-addressing dedup set over items; slot empty unless gen matches */
    size_t setcap;
    unsigned gen;
    size_t *fired, nfired; /* rules that fired; capacity Rules.nrules */
    uint64_t *cand;        /* an update's candidates; capacity the largest TableEnt.nwords */
    size_t *chans, nchans; /* distinct channels to publish; capacity Rules.nchannels */
    Buf payload;
    unsigned refresh_deletes; /* this eval's refresh entries that fell back to deleting */
    /* Tables rules_eval() found recently, by the address of the name it
     * was given (checked by name before reuse; rules_eval.c table_of). */
    RecentTable recent[RULES_RECENT_TABLES];
} Scratch;

struct Rules {
    Rule *rules;
    size_t nrules, rulecap;
    TableEnt *tables;
    size_t ntables, tablecap;
    size_t *thash; /* table index + 1, 0 = empty; thashcap is a power of two */
    size_t thashcap;
    char **channels;
    size_t nchannels, chancap;
    bool use_del;
    char *tag_prefix;
    Scratch *scratch;
};

static inline uint64_t hash_bytes(const char *s, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= UINT64_C(1099511628211);
    }
    return h;
}

#define HASH_SEED UINT64_C(14695981039346656037)

/* The rules for table (exact "schema.table"), or NULL. */
const TableEnt *rules_table_find(const Rules *r, const char *table);

/* Append a problem at loc (line/column/path) to *p. */
void rules_problem_at(RulesProblems *p, const SrcLoc *loc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
