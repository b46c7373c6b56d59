/*
 * main.c — walbust entry point: parse options, dispatch the subcommand.
 */
#include <stdio.h>
#include <stdlib.h>

#include "cmds.h"
#include "log.h"
#include "opts.h"

#ifndef WALBUST_VERSION
#define WALBUST_VERSION "0.0.0"
#endif

int main(int argc, char **argv)
{
    Config cfg;
    int rc = opts_parse(argc, argv, &cfg);

    if (rc != 0)
        return rc;
    if (log_configure(cfg.log_format, cfg.log_level) != 0) {
        fprintf(stderr, "walbust: unknown --log-format \"%s\" or --log-level \"%s\" (text|json; "
                        "debug|info|warn|error)\n",
                cfg.log_format, cfg.log_level);
        return 2;
    }
    switch (cfg.command) {
    case CMD_HELP:
        opts_usage(stdout, cfg.help_for);
        return 0;
    case CMD_VERSION:
        printf("walbust %s\n", WALBUST_VERSION);
        return 0;
    case CMD_RUN:
        return cmd_run(&cfg);
    case CMD_DECODE:
        return cmd_decode(&cfg);
    case CMD_CHECK:
        return cmd_check(&cfg);
    case CMD_SETUP:
        return cmd_setup(&cfg);
    case CMD_STATUS:
        return cmd_status(&cfg);
    case CMD_TEARDOWN:
        return cmd_teardown(&cfg);
    case CMD_AUDIT:
        return cmd_audit(&cfg);
    default:
        opts_usage(stderr, CMD_NONE);
        return 2;
    }
}
