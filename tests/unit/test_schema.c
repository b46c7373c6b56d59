/* Unit tests for schema.c: which DDL messages and Relation messages mark
 * the schema for a re-check (no server needed; schema_apply() is covered by
 * tests/e2e/test_schema_changes.py against a real PostgreSQL). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "schema.h"

static Rules *rules;

static Schema *fresh(void)
{
    SchemaConfig cfg = {.conninfo = "host=/nonexistent",
                        .publication = "walbust",
                        .rules_path = "rules.json",
                        .recheck_s = 3600};
    return schema_new(&cfg, rules);
}

static bool message(Schema *s, const char *prefix, const char *content)
{
    PgoMsg m = {.kind = PGO_MESSAGE};

    m.u.message.transactional = true;
    m.u.message.prefix = prefix;
    m.u.message.content = content;
    m.u.message.len = (uint32_t)strlen(content);
    return schema_on_message(s, &m);
}

/* One DDL message with one object: does it mark the schema pending? */
static bool marks(const char *tag, const char *type, const char *identity, unsigned oid)
{
    char json[512];
    Schema *s = fresh();
    bool pending;

    snprintf(json, sizeof json,
             "{\"v\": 1, \"op\": \"ddl\", \"event\": \"ddl_command_end\", \"tag\": \"%s\", "
             "\"objects\": [{\"type\": \"%s\", \"identity\": \"%s\", \"oid\": %u}]}",
             tag, type, identity, oid);
    assert_true(message(s, SCHEMA_DDL_PREFIX, json));
    pending = schema_due(s, /* idle= */ false);
    schema_free(s);
    return pending;
}

static void test_prefixes(void **state)
{
    Schema *s = fresh();
    (void)state;
    assert_false(message(s, "walbust", "{\"v\": 1, \"op\": \"invalidate\", \"keys\": [\"k\"]}"));
    assert_false(message(s, "other", "x"));
    assert_false(schema_due(s, false));
    /* Anything under the DDL prefix is consumed, even when malformed; a
     * malformed one marks pending (the safe side). */
    assert_true(message(s, SCHEMA_DDL_PREFIX, "not json"));
    assert_true(schema_due(s, false));
    schema_free(s);
}

static void test_objects(void **state)
{
    (void)state;
    assert_true(marks("CREATE TABLE", "table", "public.users", 1));
    assert_true(marks("ALTER TABLE", "table", "public.users", 1));
    assert_true(marks("ALTER TABLE", "table column", "public.users.name", 1));
    assert_true(marks("DROP TABLE", "table", "public.users", 1));
    assert_false(marks("CREATE TABLE", "table", "public.other", 1));
    assert_false(marks("ALTER TABLE", "table column", "public.users_x.name", 1));
    assert_false(marks("ALTER TABLE", "table column", "public.other.users", 1));
    assert_true(marks("ALTER PUBLICATION", "publication relation",
                      "public.users in publication walbust", 9));
    assert_true(marks("DROP PUBLICATION", "publication", "walbust", 9));
    assert_true(marks("ALTER SCHEMA", "schema", "public", 9));
    assert_true(marks("DROP INDEX", "index", "public.users_pkey", 9));
}

static void test_empty_objects(void **state)
{
    Schema *s = fresh();
    (void)state;
    assert_true(message(s, SCHEMA_DDL_PREFIX,
                        "{\"v\": 1, \"op\": \"ddl\", \"tag\": \"GRANT\", \"objects\": []}"));
    assert_false(schema_due(s, false));
    schema_free(s);
}

static void test_relation(void **state)
{
    PgoColumn cols[2] = {{(char *)"id", 23, -1, true}, {(char *)"name", 25, -1, false}};
    const char *names[2] = {"id", "name"};
    PgoRelation rel = {
        16384, (char *)"public", (char *)"users", (char *)"public.users", 'd', 2, cols, names, 1};
    PgoRelation other = rel;
    Schema *s = fresh();
    (void)state;

    other.qualname = (char *)"public.other";
    other.relid = 5;
    schema_on_relation(s, &other);
    schema_on_relation(s, &rel); /* first sight: what the start-up check saw */
    schema_on_relation(s, &rel);
    assert_false(schema_due(s, false));
    cols[1].name = (char *)"full_name"; /* RENAME COLUMN */
    schema_on_relation(s, &rel);
    assert_true(schema_due(s, false));
    schema_free(s);

    s = fresh();
    schema_on_relation(s, &rel);
    rel.relid = 16999; /* a new table under the same name */
    schema_on_relation(s, &rel);
    assert_true(schema_due(s, false));
    schema_free(s);
}

static void test_backstop_only_when_idle(void **state)
{
    SchemaConfig cfg = {
        .conninfo = "", .publication = "walbust", .rules_path = "r.json", .recheck_s = 1};
    Schema *s = schema_new(&cfg, rules);
    (void)state;
    assert_false(schema_due(s, true));
    usleep(1050000);
    assert_true(schema_due(s, /* idle= */ true));
    assert_false(schema_due(s, /* idle= */ false));
    schema_free(s);
}

int main(void)
{
    const char *json = "{\"rules\": [{\"table\": \"public.users\", \"changed\": [\"name\"], "
                       "\"keys\": [\"user:{id}\"]}]}";
    RulesProblems pr = {0, NULL};
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefixes),
        cmocka_unit_test(test_objects),
        cmocka_unit_test(test_empty_objects),
        cmocka_unit_test(test_relation),
        cmocka_unit_test(test_backstop_only_when_idle),
    };
    int rc;

    rules = rules_parse(json, strlen(json), &pr);
    if (rules == NULL)
        return 1;
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    rules_free(rules);
    return rc;
}
