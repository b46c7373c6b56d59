/*
 * schema.h — schema changes on the rules' tables while walbust runs.
 *
 * A migration must never leave walbust silently stale. Three sources tell
 * this module that the schema may have changed:
 *  - 'walbust.ddl' logical messages from the event triggers of
 *    sql/walbust.sql, decoded at the migration's COMMIT, in WAL order;
 *  - pgoutput Relation messages (a published table's new shape or relid);
 *  - a periodic re-check of the catalog (the backstop for DDL the trigger
 *    cannot see: trigger not installed, or disabled).
 * Each marks the schema "pending"; schema_apply(), called by the daemon at
 * the COMMIT that carried the change (or when idle, for the backstop),
 * re-reads the catalog on a plain connection, re-validates the rules against
 * it and acts, per rules table:
 *  - dropped: everything its rules cover is invalidated (widened, as for a
 *    truncate); its rules wait for the table to come back;
 *  - came back under the same name (drop/create, rename swap) or dropped out
 *    of the publication: when walbust manages the publication (setup created
 *    it: its COMMENT starts with "walbust:"), the table is added back, walbust
 *    waits for transactions that were running meanwhile, and everything its
 *    rules cover is invalidated (its changes between the CREATE and the ADD
 *    TABLE were never published and cannot be decoded, so only a widened
 *    invalidation makes sure none of them is missed). When walbust does not
 *    manage the publication, schema_apply() fails with a message naming the
 *    table, the change and the fix, and the daemon stops without confirming
 *    the COMMIT;
 *  - columns renamed or dropped: the rules engine already fires a rule whose
 *    `changed` column is gone and widens a template whose column is gone;
 *    the problems are logged once (as warnings).
 * Invalidations are handed to the daemon's emit callback, so they ride in
 * the batch that confirms the COMMIT: nothing is confirmed past a schema
 * change before its invalidations were applied.
 */
#ifndef WALBUST_SCHEMA_H
#define WALBUST_SCHEMA_H

#include <stdbool.h>
#include <stddef.h>

#include <libpq-fe.h>

#include "pgo.h"
#include "rules.h"

/* Prefix of the DDL messages emitted by sql/walbust.sql. */
#define SCHEMA_DDL_PREFIX "walbust.ddl"

/* Default seconds between backstop catalog re-checks. */
#define SCHEMA_RECHECK_DEFAULT_S 30

typedef struct SchemaConfig {
    const char *conninfo;    /* for the plain connection (never logged) */
    const char *publication; /* walbust's publication */
    const char *rules_path;  /* for messages */
    int recheck_s;           /* backstop interval; <= 0: the default */
    RulesEmitFn emit;        /* receives widened invalidations */
    void (*tick)(void *arg); /* keeps the replication connection alive while waiting */
    void *arg;               /* passed to emit and tick */
} SchemaConfig;

typedef struct Schema Schema;

/* A module watching the tables of rules (borrowed; see schema_set_rules).
 * cfg's strings are borrowed for the module's lifetime. Never NULL (aborts
 * when out of memory). Free with schema_free(). */
Schema *schema_new(const SchemaConfig *cfg, const Rules *rules);

/* Close the connection and free. Accepts NULL. */
void schema_free(Schema *s);

/* The rules changed (SIGHUP): watch these instead (borrowed). Tables new to
 * the rules are learnt at the next check (due at once) without acting on
 * them. */
void schema_set_rules(Schema *s, const Rules *rules);

/* How many DDL messages, Relation messages and catalog checks the module
 * has seen: what schema_set_rules_checked() compares. */
uint64_t schema_generation(const Schema *s);

/* The relid of each table of rules (relids[i] for rules_table(rules, i)):
 * an ordinary or partitioned table of that "schema.table" name, 0 when
 * there is none. One query on conn, whatever the number of tables: the
 * reload thread runs it on its own connection. Returns 0, or -1 with err
 * set. */
int schema_load_relids(PGconn *conn, const Rules *rules, uint32_t *relids, char *err, size_t errlen)
    __attribute__((warn_unused_result));

/* As schema_set_rules(), for rules already validated against the catalog
 * off the streaming thread (no problems found: the reload refuses rules
 * with problems) with relids from schema_load_relids(), read after
 * schema_generation() returned generation. When the generation is still
 * the same (no DDL or Relation message and no check since), tables new to
 * the rules take those relids and no check is due: a reload of thousands
 * of tables does not pause streaming for a catalog check. Otherwise (or
 * relids NULL) the new tables are learnt at a check due at once. */
void schema_set_rules_checked(Schema *s, const Rules *rules, const uint32_t *relids,
                              uint64_t generation);

/* Before streaming: learn each rules table's relid, and put a rules table
 * that is missing from a managed publication back into it (invalidating
 * everything its rules cover, since its changes were not published). Tables
 * missing from an unmanaged publication are left to the start-up check,
 * which refuses to start. Returns 0, or -1 with err set when the catalog
 * could not be read or the table could not be added. */
int schema_startup(Schema *s, const char *lsn, char *err, size_t errlen)
    __attribute__((warn_unused_result));

/* A decoded logical message. Returns true when it was a DDL message (prefix
 * SCHEMA_DDL_PREFIX, whatever its content): the caller must not treat it as
 * an explicit-invalidation message. A DDL message naming a rules table, its
 * columns, a publication or a schema marks the schema pending. */
bool schema_on_message(Schema *s, const PgoMsg *m);

/* A decoded Relation message: a rules table with a relid or columns other
 * than last seen marks the schema pending. */
void schema_on_relation(Schema *s, const PgoRelation *rel);

/* After rules_eval() of one change: warn once per table when a column named
 * in `changed` is missing (st->changed_missing). */
void schema_note_eval(Schema *s, const char *table, const RulesEvalStats *st);

/* Is a check due: a change was seen (pending), or the backstop interval has
 * passed or its background read finished (only when idle is true: outside
 * a transaction)? */
bool schema_due(const Schema *s, bool idle);

/* Is the backstop's background read still running? schema_set_rules()
 * waits for it (it reads the rules being replaced): the daemon defers a
 * reload's swap meanwhile. */
bool schema_busy(const Schema *s);

/* Re-check the catalog and act (see the file comment). lsn names the
 * position for log lines (the COMMIT being processed). The backstop (when
 * nothing is pending) reads the catalog on a thread and connection of its
 * own: the first call starts the read, a call once it finished compares
 * and acts, unless a check acted, a change was noted or the rules were
 * replaced meanwhile (then the read is dropped and the next backstop is an
 * interval later). Returns 0 when done
 * (invalidations, if any, emitted), -1 when walbust must stop: err names
 * the table, the change and the fix. A catalog that cannot be read is
 * retried on the next call (the schema stays pending) and is not fatal:
 * returns 0 after logging. */
int schema_apply(Schema *s, const char *lsn, char *err, size_t errlen)
    __attribute__((warn_unused_result));

/* How many rules problems the last catalog check found (0: the rules match
 * the live schema), e.g. for a readiness check; *first (when first is not
 * NULL) is the first problem's text, valid until the next check, or NULL. */
size_t schema_problems(const Schema *s, const char **first);

/* Did the last catalog check find the publication missing (dropped while
 * walbust runs)? False until a check ran. */
bool schema_publication_missing(const Schema *s);

#endif
