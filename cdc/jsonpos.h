/*
 * jsonpos.h — where things are in a JSON text: line/column lookups.
 *
 * cJSON turns a rules file into a tree but forgets where each value came
 * from. jsonpos is a tiny tokenizer over the raw text that answers the
 * questions an error message needs: "on which line and column does the value
 * at rules[2].keys[0] start?", "where is the key of that member?", and, when
 * the text is not JSON at all, "where is the first syntax error and what is
 * wrong there?". Pure: no allocation, no I/O, no logging.
 *
 * Lines and columns are 1-based. Lines are counted by '\n'. Columns count
 * characters, not bytes: a UTF-8 sequence is one column and a tab is one
 * column, so the numbers match what editors show for UTF-8 text.
 *
 * Path syntax (used by jsonpos_find and jsonpos_find_key):
 *   ""                 the top-level value
 *   "rules"            member "rules" of the top-level object
 *   "rules[2].keys[0]" members are joined with '.', indexes in brackets
 *   "a[\"x.y\"]"       a member whose name needs quoting: a JSON string in
 *                      brackets (with JSON escapes)
 *   "rules[0][3]"      an index applied to an object selects its 4th member
 *                      in document order (how to point at the second of two
 *                      members with the same name)
 * A member name selects the first member with that name, like cJSON does.
 */
#ifndef WALBUST_JSONPOS_H
#define WALBUST_JSONPOS_H

#include <stdbool.h>
#include <stddef.h>

typedef struct JsonPos {
    size_t offset; /* byte offset into the text */
    int line;      /* 1-based */
    int column;    /* 1-based, in characters */
} JsonPos;

/* Line and column of byte `offset` in text (len bytes). An offset past the
 * end is clamped to len (the position just after the last character). */
void jsonpos_at(const char *text, size_t len, size_t offset, JsonPos *out);

/* Find the first character of the value at `path` (syntax above) in text.
 * Returns true and fills *out, or false when the path does not exist, the
 * path is malformed, or the text is not well-formed along the way. */
bool jsonpos_find(const char *text, size_t len, const char *path, JsonPos *out)
    __attribute__((warn_unused_result));

/* Like jsonpos_find, but for a path whose last step selects an object member
 * (by name or index): the position of the member's key (its opening quote)
 * instead of its value. Returns false when the last step is an array index. */
bool jsonpos_find_key(const char *text, size_t len, const char *path, JsonPos *out)
    __attribute__((warn_unused_result));

/* A finder over one text for many lookups. It remembers where its last
 * lookup went, so lookups in document order (rules[0].table, rules[0].keys[1],
 * rules[1].table, ...) each cost the distance from the previous one instead
 * of a walk from the start: locating every value of a rules file with
 * 10,000 rules takes linear time, not quadratic. Answers are those of
 * jsonpos_find / jsonpos_find_key for any path, in any order. The text is
 * borrowed and must not change while the finder is used. */
#define JSONPOS_FINDER_DEPTH 8
typedef struct JsonFinderStep {
    size_t end;                      /* where the step ends in the cached path */
    size_t container, member, index; /* where it looked, what it found */
    size_t key, value;
    bool is_index;
} JsonFinderStep;
typedef struct JsonFinder {
    const char *text;
    size_t len;
    char path[512]; /* the last path found (its first steps[nsteps-1].end bytes) */
    JsonFinderStep steps[JSONPOS_FINDER_DEPTH];
    size_t nsteps;
    size_t at_offset; /* the last position answered, for counting lines on */
    int at_line, at_column;
} JsonFinder;

/* Start a finder over text (len bytes). */
void jsonpos_finder_init(JsonFinder *f, const char *text, size_t len);

/* jsonpos_find (want_key false) or jsonpos_find_key (true) through f. */
bool jsonpos_finder_find(JsonFinder *f, const char *path, bool want_key, JsonPos *out)
    __attribute__((warn_unused_result));

/* Check that text is one JSON value (surrounded by optional whitespace).
 * Returns true when it is. Otherwise returns false, sets *where to the
 * offending place (e.g. the trailing comma, the never-closed '{' or string,
 * the unexpected character) and writes a lowercase message that says what is
 * wrong and what to do into msg (msgsize bytes, always NUL-terminated).
 * Accepts what cJSON accepts (leading zeros, raw control characters inside
 * strings); nesting deeper than JSONPOS_MAX_DEPTH is an error. */
#define JSONPOS_MAX_DEPTH 1000
bool jsonpos_check(const char *text, size_t len, JsonPos *where, char *msg, size_t msgsize)
    __attribute__((warn_unused_result));

#endif
