/*
 * rules.h — the rules engine: compiled invalidation rules and rendering.
 *
 * A rules file (JSON, see rules/walbust.schema.json and docs/rules.md) is
 * parsed once into compiled rules; cJSON is only the parser. For each row
 * change the engine finds the rules for the table and event, applies the
 * `changed` filter, renders key/pattern/tag/version templates from the right
 * row image(s) and emits invalidations through a callback. Pure: no I/O, no
 * logging, no exit. Errors are collected as RulesProblem entries with line
 * and column where the file has them.
 *
 * Rendering (docs/guarantees.md guarantees 7 and 8, docs/rules.md):
 *  - `{col}` renders from the new row on insert, the old row on delete and
 *    from both images on update (duplicates merged); `{new.col}`/`{old.col}`
 *    pick one image; a template whose image does not exist for the event
 *    (`{old.x}` on insert, `{new.x}` on delete) yields nothing.
 *    `{{` and `}}` are literal braces.
 *  - a SQL NULL value suppresses that rendering (no key).
 *  - a value the change does not carry (RULES_VAL_MISSING) becomes `*` and
 *    the key is emitted as a pattern with every other value and literal text
 *    glob-escaped; RulesEvalStats.widened counts these.
 *  - values inside pattern templates are glob-escaped (`*?[]\`).
 *  - `changed` (updates only): the rule fires when a listed column's value
 *    differs, is not carried (MISSING), or the column is not in the table at
 *    all (renamed or dropped: RulesEvalStats.changed_missing counts these).
 *  - truncate: keys, patterns and tags widened in full and emitted as
 *    patterns (tags as patterns over tag set names, RULES_INV_TAG_PATTERN);
 *    versions as RULES_INV_VERSION_PATTERN; one publish per channel.
 */
#ifndef WALBUST_RULES_H
#define WALBUST_RULES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lsn.h"

typedef enum RulesOp {
    RULES_INSERT = 1 << 0,
    RULES_UPDATE = 1 << 1,
    RULES_DELETE = 1 << 2,
    RULES_TRUNCATE = 1 << 3,
} RulesOp;

/* What the sink must do with one rendered string. */
typedef enum RulesInvAction {
    RULES_INV_KEY,             /* UNLINK (or DEL) the key */
    RULES_INV_PATTERN,         /* SCAN MATCH pattern + UNLINK every match */
    RULES_INV_TAG,             /* delete members of set `s` and the set */
    RULES_INV_TAG_PATTERN,     /* every tag set matching `s`: as RULES_INV_TAG */
    RULES_INV_VERSION,         /* INCR the key */
    RULES_INV_VERSION_PATTERN, /* INCR every existing key matching `s` */
    RULES_INV_PUBLISH,         /* PUBLISH channel `s` the payload */
    RULES_INV_REFRESH,         /* store the row in key `s`, fenced (payload below) */
    RULES_INV_STALE,           /* mark key `s` stale (payload below) */
} RulesInvAction;

/* Payloads of RULES_INV_REFRESH and RULES_INV_STALE: four NUL-separated
 * fields "mode\0lsn\0seconds\0value" (payload_len counts every byte).
 * Refresh: mode "json" or "hash", the commit LSN ("X/X"), the TTL (0: none)
 * and the row as a JSON object (column -> text or null). Stale: mode
 * "stale", an empty LSN, the grace period and an empty value. These are the
 * ARGV of redis/refresh.lua. Never merged within a batch (order matters). */

typedef enum RulesValKind {
    RULES_VAL_TEXT,    /* data/len hold PostgreSQL's text output */
    RULES_VAL_NULL,    /* SQL NULL */
    RULES_VAL_MISSING, /* not carried by the change (no old image, TOAST) */
} RulesValKind;

typedef struct RulesValue {
    RulesValKind kind;
    const char *data; /* borrowed; not NUL-terminated */
    size_t len;
} RulesValue;

/* One row change as the rules engine sees it. All pointers are borrowed for
 * the duration of rules_eval(). */
typedef struct RulesChange {
    const char *table;          /* "schema.table" */
    RulesOp op;
    size_t ncols;
    const char *const *colnames; /* ncols names, in column order */
    const RulesValue *old_vals;  /* ncols values, or NULL: no old image */
    const RulesValue *new_vals;  /* ncols values, or NULL (delete) */
    /* Publish payload fields. The texts may be NULL while has_commit is
     * set (below): rules_change_lsn() and rules_change_time() then format
     * them from the numbers, only for the changes that need them (payloads,
     * refresh fences, audit samples). */
    const char *lsn;             /* commit LSN as "X/X" */
    uint32_t xid;
    const char *commit_time;     /* RFC 3339 UTC */
    /* An insert or delete on a declarative partition: it may be one half of
     * an UPDATE that moved the row to another partition, which PostgreSQL
     * publishes as a delete plus an insert. Rules that fire on update then
     * fire too, rendering from the one image present; `changed` counts as
     * changed. */
    bool partition_row;
    /* The commit's numbers (see lsn and commit_time above). */
    bool has_commit; /* commit_lsn and commit_ts are set */
    uint64_t commit_lsn;
    int64_t commit_ts; /* PostgreSQL's microseconds since 2000-01-01 UTC */
    /* Nonzero: names this colnames array (and ncols) for as long as it
     * lives, never reused for another (the decoder's relation generation).
     * Rules then map their columns once per shape instead of checking the
     * names on every change. 0: unknown, checked every time. */
    uint32_t shape;
} RulesChange;

/* The change's commit LSN as text: chg->lsn, or formatted into buf
 * (LSN_TEXT_MAX bytes) from the number; NULL when it has neither. */
static inline const char *rules_change_lsn(const RulesChange *chg, char *buf)
{
    if (chg->lsn != NULL || !chg->has_commit)
        return chg->lsn;
    return lsn_format(chg->commit_lsn, buf);
}

/* The same for the commit time (buf: PGTIME_TEXT_MAX bytes). */
static inline const char *rules_change_time(const RulesChange *chg, char *buf)
{
    if (chg->commit_time != NULL || !chg->has_commit)
        return chg->commit_time;
    return pgtime_format(chg->commit_ts, buf);
}

/* Receives each invalidation. `s` is NUL-terminated and valid only during the
 * call; for RULES_INV_PUBLISH, payload/payload_len is the JSON message, else
 * NULL/0. */
typedef void (*RulesEmitFn)(void *arg, RulesInvAction action, const char *s, size_t len,
                            const char *payload, size_t payload_len);

typedef struct RulesEvalStats {
    unsigned matched;  /* rules that fired */
    unsigned widened;  /* renderings widened to a pattern (docs/guarantees.md guarantee 8) */
    unsigned emitted;  /* invalidations emitted */
    unsigned changed_missing; /* rules that fired on update because a column
                                 named in `changed` is not in the table */
    unsigned refreshes;       /* RULES_INV_REFRESH emitted (rows to store) */
    unsigned refresh_deletes; /* refresh entries that deleted their key instead
                                 because the change lacked a column's value
                                 (an unchanged TOASTed value) */
    unsigned stales;          /* RULES_INV_STALE emitted (keys to mark stale) */
    unsigned examined;        /* rules looked at: only those of the change's own
                                 table, however many other tables have rules */
} RulesEvalStats;

/* One problem found while loading or checking rules. */
typedef struct RulesProblem {
    int line;   /* 1-based; 0 when not tied to a place in the file */
    int column; /* 1-based; 0 when unknown */
    char path[128];   /* JSON path, e.g. "rules[2].keys[0]"; "" when none */
    char msg[1024];
} RulesProblem;

typedef struct RulesProblems {
    size_t count;
    RulesProblem *items; /* owned; free with rules_problems_release() */
} RulesProblems;

void rules_problems_release(RulesProblems *p);

typedef struct Rules Rules;

/* Compile rules from JSON text (len bytes, need not be NUL-terminated).
 * On success returns the rules and leaves *problems empty. On any problem
 * returns NULL and fills *problems (all problems found, not just the
 * first), each with line/column where known. Caller frees with rules_free()
 * and rules_problems_release(). */
Rules *rules_parse(const char *json, size_t len, RulesProblems *problems)
    __attribute__((warn_unused_result));

/* Free compiled rules. Accepts NULL. */
void rules_free(Rules *r);

/* Evaluate one change: emit every invalidation the rules produce for it.
 * Returns the number of rules that matched. stats may be NULL. Never fails:
 * out of memory aborts. Emits in rule order, keys before patterns, tags,
 * versions, then publishes. Duplicate strings within one change are merged. */
unsigned rules_eval(const Rules *r, const RulesChange *chg, RulesEmitFn emit, void *arg,
                    RulesEvalStats *stats);

/* ---- lookups (docs/rules.md "Lookups") ----------------------------------------
 *
 * A rule with a `lookup` does not render at decode time (rules_eval() skips
 * it for row changes; a truncate widens it like any rule). Instead
 * rules_eval_lookups() reports one call per distinct argument tuple (on an
 * update whose arguments use {col}: the old and the new image's, once when
 * equal; a NULL argument value: no call). The caller runs the query later,
 * after the commit is visible, and renders each result row with
 * rules_render_lookup(): a bare {name} reads the result row's column of that
 * name when the result has one (the lookup wins), otherwise the changed
 * row's; {old.x}/{new.x} always read the changed row. */

/* One lookup to run for one change. All pointers are borrowed for the
 * duration of the callback (copy what you keep). */
typedef struct RulesLookupCall {
    size_t rule; /* rule index (rules_lookup_info()) */
    RulesOp op;
    size_t nargs;
    const char *const *args; /* nargs NUL-terminated argument values */
    const size_t *arglens;
    size_t ncols;               /* the rule's referenced columns ... */
    const RulesValue *old_vals; /* ... their old values (NULL: no old image) */
    const RulesValue *new_vals; /* ... their new values (NULL: no new image) */
    bool unknown_args;          /* an argument's value is not carried: do not run, widen */
} RulesLookupCall;

typedef void (*RulesLookupCallFn)(void *arg, const RulesLookupCall *call);

/* Report (through fn) the lookups the change needs; returns the number of
 * lookup rules that fired (event, `changed` filter). Same threading caveat
 * as rules_eval(). */
unsigned rules_eval_lookups(const Rules *r, const RulesChange *chg, RulesLookupCallFn fn,
                            void *arg);

/* Render call's rule for one lookup result row: fields[0..nfields) are the
 * result's column names, row[] their values; row NULL renders every
 * placeholder that names a result column as `*` (widened: emitted as
 * patterns and counted in stats->widened). Emits like rules_eval() (keys,
 * patterns, tags, versions; deduplicated within the row). Not while another
 * rules_eval*() on r is running. */
void rules_render_lookup(const Rules *r, const RulesLookupCall *call, size_t nfields,
                         const char *const *fields, const RulesValue *row, RulesEmitFn emit,
                         void *arg, RulesEvalStats *stats);

/* What a rule's lookup is. */
typedef struct RulesLookupInfo {
    const char *table; /* the rule's table */
    const char *sql;
    size_t nargs;
    size_t limit;     /* result rows allowed before widening */
    int line, column; /* of the "lookup" object in the file (0: unknown) */
} RulesLookupInfo;

/* Number of rules (indexes for rules_lookup_info()). */
size_t rules_rule_count(const Rules *r);

/* Fill *out for rule i; false when the rule has no lookup. */
bool rules_lookup_info(const Rules *r, size_t i, RulesLookupInfo *out);

/* Does any rule have a lookup? */
bool rules_has_lookups(const Rules *r);

/* Does any rule name this table ("schema.table")? */
bool rules_has_table(const Rules *r, const char *table);

/* The operations any rule on table fires on (RulesOp bits; 0: none). */
unsigned rules_table_ops(const Rules *r, const char *table);

/* Number of distinct tables named, and the i-th ("schema.table"). */
size_t rules_table_count(const Rules *r);
const char *rules_table(const Rules *r, size_t i);

/* defaults.delete: true when "del" was chosen instead of "unlink". */
bool rules_use_del(const Rules *r);

/* defaults.tag_prefix ("tag:" when not set). */
const char *rules_tag_prefix(const Rules *r);

/* What the database says about one table, for rules_check_catalog(). */
typedef struct RulesTableInfo {
    const char *table;            /* "schema.table" */
    bool exists;
    char replident;               /* 'd', 'n', 'f', 'i' */
    size_t ncols;
    const char *const *colnames;
    const bool *identity;         /* ncols flags: column is in the replica identity */
    bool in_publication;
    /* Added for partitions, inheritance and hints; zero/NULL when the
     * caller does not know (older callers and simple views stay valid). */
    const char *sql_name;            /* the name as SQL (quote_ident rules) */
    const char *suggestion;          /* missing table: closest existing name */
    char relkind;                    /* 'r' table, 'p' partitioned; 0 unknown */
    bool via_root;                   /* partitioned or a partition, and the
                                      * publication publishes via the root */
    unsigned pub_ops;                /* RulesOp bits published; 0 unknown */
    const char *ops_publication;     /* the publication those come from */
    size_t nunpublished;             /* partitions/children the publication */
    const char *const *unpublished;  /* lacks, as SQL names */
    size_t nnot_full;                /* tables holding the rows that are not */
    const char *const *not_full;     /* REPLICA IDENTITY FULL, as SQL names */
} RulesTableInfo;

/* Check the rules against the live schema: tables and columns that do not
 * exist, tables missing from the publication (named in the message), and
 * `{col}`/`{old.col}` placeholders in rules firing on update or delete that
 * need a non-identity column's old value (docs/guarantees.md guarantee 7; the message names the
 * table, the template and both fixes: `ALTER TABLE <t> REPLICA IDENTITY FULL`
 * or `{new.col}`). lookup returns NULL for a table the caller knows nothing
 * about (treated as not existing). Appends to *problems; returns the number
 * of problems added. */
typedef const RulesTableInfo *(*RulesLookupFn)(void *arg, const char *table);
size_t rules_check_catalog(const Rules *r, const char *publication, RulesLookupFn lookup,
                           void *arg, RulesProblems *problems);

/* The closest of names[0..n) to s (compared case-insensitively), when close
 * enough to be a typo; else NULL. For "did you mean" hints. */
const char *rules_closest_name(const char *s, const char *const *names, size_t n);
/* What PostgreSQL says about one lookup (check --pg), for
 * rules_check_lookup(). */
typedef struct RulesLookupShape {
    const char *error; /* PREPARE failed: PostgreSQL's message; NULL when prepared */
    int error_pos;     /* 1-based character of the SQL the error points at; 0: none */
    int nparams;
    size_t nfields;
    const char *const *fields; /* result column names */
    size_t ntables;
    const char *const *tables; /* "schema.table" of every relation the plan reads */
} RulesLookupShape;

/* Check rule i's lookup against its shape and the rule's table (info may be
 * NULL when unknown): the SQL prepares, the parameter count matches "args",
 * every bare placeholder names a result column or a column of the table
 * but not both (ambiguous: rename with AS or write {new.x}/{old.x}).
 * Problems go to *problems; tables the lookup reads that no rule covers go
 * to *warnings (a change there would leave derived keys stale). Returns the
 * number of problems added. */
size_t rules_check_lookup(const Rules *r, size_t i, const RulesLookupShape *shape,
                          const RulesTableInfo *info, RulesProblems *problems,
                          RulesProblems *warnings);

/* ---- audits (docs/audit.md) ---------------------------------------------------
 *
 * A rule's "audit" says how a cached key relates to the database: the key
 * template, a read-only query with argument templates and how to compare
 * ("exact" bytes or "json"). The audit's placeholders are names read back
 * from a key (rules_audit_match()), so a key found by SCAN or one walbust
 * just invalidated can be checked the same way. */

typedef struct RulesAuditInfo {
    const char *table; /* the rule's table */
    const char *key;   /* the key template as written */
    const char *sql;   /* trailing whitespace and ';' removed */
    size_t nargs;
    bool json;        /* "compare": "json" (else "exact") */
    int line, column; /* of the "audit" object (0: unknown) */
} RulesAuditInfo;

/* Fill *out for rule i; false when the rule has no audit. */
bool rules_audit_info(const Rules *r, size_t i, RulesAuditInfo *out);

/* Does any rule have an audit? */
bool rules_has_audits(const Rules *r);

/* The glob pattern matching every key rule i's audit key can render (its
 * literal text glob-escaped, each placeholder `*`), for SCAN MATCH.
 * Returns a string the caller frees, or NULL when rule i has no audit. */
char *rules_audit_pattern(const Rules *r, size_t i);

/* The audit's arguments read back from a key. */
typedef struct RulesAuditArgs {
    size_t n;
    char **args; /* n NUL-terminated strings (no NUL inside) */
    int *lens;
} RulesAuditArgs;

/* Read key (len bytes) back through rule i's audit key template (each
 * placeholder one or more bytes, a repeated placeholder the same bytes)
 * and render the audit's arguments from the values. Returns 1 with *out
 * filled (free with rules_audit_args_release()), 0 when the key does not
 * match (or a value would hold a NUL byte), -1 when it matches in more
 * than one way (the values are ambiguous: such a key is not checkable).
 * out may be NULL: then only the answer is computed, and a call allocates
 * nothing unless the template has more than 7 placeholder names (a key
 * whose beginning or end differs from the template's literal text is
 * refused before any matching). *out is emptied on 0 and -1. */
int rules_audit_match(const Rules *r, size_t i, const char *key, size_t len, RulesAuditArgs *out)
    __attribute__((warn_unused_result));

/* Free what rules_audit_match() filled. Accepts an empty one. */
void rules_audit_args_release(RulesAuditArgs *a);

/* What PostgreSQL says about an audit's SQL (check --pg): PREPARE's error
 * (or NULL), the parameter and result column counts. */
typedef struct RulesAuditShape {
    const char *error;
    int error_pos; /* 1-based character of the SQL; 0: none */
    int nparams;
    size_t nfields;
} RulesAuditShape;

/* Check rule i's audit against its shape: it prepares, takes one parameter
 * per "args" entry and returns exactly one column (the value the key must
 * hold). Appends to *problems; returns the number added. */
size_t rules_check_audit(const Rules *r, size_t i, const RulesAuditShape *shape,
                         RulesProblems *problems);

/* Append the glob-escaped form of s (each of `*?[]\` preceded by `\`) to
 * out, which must have room for 2*len+1 bytes. Returns bytes written
 * (excluding the NUL, which is written). */
size_t rules_glob_escape(const char *s, size_t len, char *out);

#endif
