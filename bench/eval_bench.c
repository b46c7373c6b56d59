/*
 * eval_bench.c — the rules engine's cost per change, in process, for
 * bench/run's rules10k scenario.
 *
 * A drain measures walbust's whole CPU per change (reading, decoding, the
 * rules, batching, Redis), and on a shared two-core machine its rounds
 * differ by up to 20 %: too coarse to tell whether evaluating a change gets
 * slower when other tables have thousands of rules. This program times
 * rules_eval() alone, on the same rules files, with nothing else running
 * in between: it parses RULES, builds UPDATEs of public.hot as the scenario
 * writes them (columns id, v, c0..c9; REPLICA IDENTITY FULL, so both images
 * carry every column; v changes, id cycles over 100,000 rows, their texts
 * made before the clock starts), evaluates them N times and prints one JSON
 * line:
 *
 *   {"changes":N, "ns_per_change":..., "emitted_per_change":..., "rules":...}
 *
 * ns_per_change is the best of --repeat timed passes (CLOCK_THREAD_CPUTIME_ID:
 * CPU time of this thread, so preemption by other work does not count).
 *
 * usage: eval_bench RULES.json [N] [--repeat K]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rules.h"

#define HOT_COLS 12 /* id, v, c0..c9 */
#define HOT_ROWS 100000

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;

    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 ||
        fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "eval_bench: cannot read %s\n", path);
        exit(2);
    }
    buf = malloc((size_t)n + 1);
    if (buf == NULL || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "eval_bench: cannot read %s\n", path);
        exit(2);
    }
    buf[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void count(void *arg, RulesInvAction action, const char *s, size_t len, const char *payload,
                  size_t payload_len)
{
    (void)action, (void)s, (void)payload, (void)payload_len;
    *(unsigned long long *)arg += len > 0;
}

static double thread_cpu_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    static const char *const names[HOT_COLS] = {"id", "v",  "c0", "c1", "c2", "c3",
                                                "c4", "c5", "c6", "c7", "c8", "c9"};
    long n = 1000000, repeat = 5;
    const char *path = NULL;
    RulesProblems problems = {0};
    static char ids[HOT_ROWS][8];
    RulesValue oldv[HOT_COLS], newv[HOT_COLS];
    unsigned long long emitted = 0;
    double best = 0;
    size_t len;
    char *json;
    Rules *rules;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc)
            repeat = strtol(argv[++i], NULL, 10);
        else if (path == NULL)
            path = argv[i];
        else
            n = strtol(argv[i], NULL, 10);
    }
    if (path == NULL || n <= 0 || repeat <= 0) {
        fprintf(stderr, "usage: eval_bench RULES.json [N] [--repeat K]\n");
        return 2;
    }
    json = slurp(path, &len);
    rules = rules_parse(json, len, &problems);
    if (rules == NULL) {
        fprintf(stderr, "eval_bench: %s does not parse (%zu problems; walbust check names them)\n",
                path, problems.count);
        return 2;
    }
    for (int c = 2; c < HOT_COLS; c++)
        oldv[c] = newv[c] = (RulesValue){RULES_VAL_TEXT, "0", 1};
    oldv[1] = (RulesValue){RULES_VAL_TEXT, "1", 1};
    newv[1] = (RulesValue){RULES_VAL_TEXT, "2", 1};
    for (long r = 0; r < HOT_ROWS; r++)
        snprintf(ids[r], sizeof ids[r], "%ld", r + 1);
    for (long pass = 0; pass < repeat; pass++) {
        double t0 = thread_cpu_ns(), dt;

        emitted = 0;
        for (long i = 0; i < n; i++) {
            const char *id = ids[i % HOT_ROWS];
            RulesChange chg = {.table = "public.hot",
                               .op = RULES_UPDATE,
                               .ncols = HOT_COLS,
                               .colnames = names,
                               .old_vals = oldv,
                               .new_vals = newv,
                               .xid = (uint32_t)i,
                               .shape = 1, /* one relation, as from the decoder */
                               .has_commit = true,
                               .commit_lsn = (uint64_t)i * 64};
            oldv[0] = newv[0] = (RulesValue){RULES_VAL_TEXT, id, strlen(id)};
            (void)rules_eval(rules, &chg, count, &emitted, NULL);
        }
        dt = (thread_cpu_ns() - t0) / (double)n;
        if (pass == 0 || dt < best)
            best = dt;
    }
    printf("{\"changes\":%ld,\"ns_per_change\":%.1f,\"emitted_per_change\":%.3f,\"rules\":%zu}\n",
           n, best, (double)emitted / (double)n, rules_rule_count(rules));
    rules_free(rules);
    free(json);
    return 0;
}
