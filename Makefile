# walbust — build, test, demo.  `make V=1` shows the full commands.

CC      ?= cc
CFLAGS  ?= -O2 -g
BUILD   ?= build
PKGS     = libpq hiredis libcjson libmicrohttpd libsystemd openssl
# Messages are deliberately cut to their buffers, so truncation is not an error.
WARN     = -std=c11 -Wall -Wextra -Wstrict-prototypes -Wwrite-strings -Werror -Wno-format-truncation
CPPFLAGS += -D_GNU_SOURCE -Icdc -I$(BUILD)/gen $(shell pkg-config --cflags $(PKGS))
LDLIBS  += $(shell pkg-config --libs $(PKGS)) -lm
CMOCKA_LIBS = $(shell pkg-config --libs cmocka)

ifeq ($(V),1)
Q =
else
Q = @
endif

VERSION := $(shell cat VERSION 2>/dev/null || echo 0.0.0)

# Pure modules: no I/O, unit-tested with cmocka.
PURE_SRCS = cdc/apply.c cdc/mem.c cdc/pgo.c cdc/rules.c cdc/rules_eval.c cdc/jsonpos.c cdc/redisurl.c cdc/change.c cdc/lsn.c \
            cdc/lookup.c cdc/relmap.c cdc/batch.c cdc/slotguard.c cdc/rules_audit.c cdc/audit.c \
            cdc/cpuwait.c cdc/commitpace.c cdc/prio.c
# Modules that talk to servers or the OS.
IO_SRCS   = cdc/stream.c cdc/catalog.c cdc/schema.c cdc/sink.c cdc/log.c cdc/opts.c \
            cdc/runtime.c cdc/decode_cmd.c cdc/run_cmd.c cdc/check_cmd.c cdc/admin_cmd.c \
            cdc/metrics.c cdc/notify.c cdc/cluster.c cdc/visible.c \
            cdc/pubplan.c cdc/route.c \
            cdc/lookup_exec.c \
            cdc/rconn.c cdc/sentinel.c
IO_SRCS  += cdc/teardown_cmd.c
IO_SRCS  += cdc/slotstore.c cdc/sink_cluster.c cdc/slotwatch.c
IO_SRCS  += cdc/audit_check.c cdc/audit_cmd.c cdc/audit_run.c
MAIN_SRC  = cdc/main.c
GEN_SRCS  = $(BUILD)/gen/redis_scripts.c

LIB_OBJS  = $(patsubst cdc/%.c,$(BUILD)/obj/%.o,$(PURE_SRCS) $(IO_SRCS)) \
            $(BUILD)/obj/redis_scripts.o
MAIN_OBJ  = $(BUILD)/obj/main.o

UNIT_TESTS = pgo rules redisurl change lsn metrics notify cluster visible lookup rconn sentinel relmap \
             schema batch slotguard apply audit audit_match cpuwait commitpace prio
UNIT_BINS  = $(addprefix $(BUILD)/tests/test_,$(UNIT_TESTS))

.PHONY: all deps test unit e2e sqltest asan demo clean format bench broken faults faults-cluster faults-broken
all: $(BUILD)/walbust

deps:
	$(Q)scripts/deps

# Every tool and Python module the tests use is installed by scripts/deps
# (.ci/run runs this on a fresh machine before any test).
.PHONY: check-deps
check-deps: deps
	$(Q)scripts/check-deps

$(BUILD)/walbust: $(LIB_OBJS) $(MAIN_OBJ)
	@echo "  LD      $@"
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/obj/%.o: cdc/%.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	$(Q)$(CC) $(CPPFLAGS) -DWALBUST_VERSION='"$(VERSION)"' $(CFLAGS) $(WARN) -MMD -MP -c -o $@ $<

# Redis-side Lua scripts are shipped under redis/ and embedded as C strings.
# sql/walbust.sql is embedded too, so `walbust setup` needs no files.
$(BUILD)/gen/redis_scripts.c: redis/tag_invalidate.lua redis/refresh.lua redis/watermark.lua sql/walbust.sql \
                          scripts/embed
	@mkdir -p $(dir $@)
	@echo "  GEN     $@"
	$(Q)scripts/embed $@ redis/tag_invalidate.lua:redis_tag_invalidate_lua \
	    redis/refresh.lua:redis_refresh_lua redis/watermark.lua:redis_watermark_lua \
	    sql/walbust.sql:walbust_sql

$(BUILD)/obj/redis_scripts.o: $(BUILD)/gen/redis_scripts.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(WARN) -c -o $@ $<

# One cmocka binary per pure module, linked against the same objects.
$(BUILD)/tests/test_pgo: $(BUILD)/obj/pgo.o
$(BUILD)/tests/test_rules: $(BUILD)/obj/rules.o $(BUILD)/obj/rules_eval.o $(BUILD)/obj/jsonpos.o \
                         $(BUILD)/obj/rules_audit.o $(BUILD)/obj/lsn.o
$(BUILD)/tests/test_audit: $(BUILD)/obj/audit.o $(BUILD)/obj/rules.o $(BUILD)/obj/rules_eval.o \
                         $(BUILD)/obj/rules_audit.o $(BUILD)/obj/jsonpos.o $(BUILD)/obj/lsn.o
$(BUILD)/tests/test_audit_match: $(BUILD)/obj/rules.o $(BUILD)/obj/rules_eval.o \
                               $(BUILD)/obj/rules_audit.o $(BUILD)/obj/jsonpos.o $(BUILD)/obj/lsn.o
# It counts allocations: malloc/calloc/realloc wrapped at link time (on
# CMOCKA_LIBS because the asan build sets LDFLAGS on the command line).
$(BUILD)/tests/test_audit_match: CMOCKA_LIBS += -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc
$(BUILD)/tests/test_redisurl: $(BUILD)/obj/redisurl.o
$(BUILD)/tests/test_lookup: $(BUILD)/obj/lookup.o $(BUILD)/obj/rules.o $(BUILD)/obj/rules_eval.o \
                          $(BUILD)/obj/jsonpos.o $(BUILD)/obj/lsn.o
$(BUILD)/tests/test_change: $(BUILD)/obj/change.o $(BUILD)/obj/pgo.o $(BUILD)/obj/lsn.o
$(BUILD)/tests/test_lsn: $(BUILD)/obj/lsn.o
$(BUILD)/tests/test_relmap: $(BUILD)/obj/relmap.o
$(BUILD)/tests/test_slotguard: $(BUILD)/obj/slotguard.o $(BUILD)/obj/lsn.o
$(BUILD)/tests/test_metrics: $(BUILD)/obj/metrics.o
$(BUILD)/tests/test_notify: $(BUILD)/obj/notify.o
$(BUILD)/tests/test_cluster: $(BUILD)/obj/cluster.o $(BUILD)/obj/rconn.o
$(BUILD)/tests/test_rconn: $(BUILD)/obj/rconn.o
$(BUILD)/tests/test_batch: $(BUILD)/obj/batch.o
$(BUILD)/tests/test_cpuwait: $(BUILD)/obj/cpuwait.o
$(BUILD)/tests/test_commitpace: $(BUILD)/obj/commitpace.o
$(BUILD)/tests/test_prio: $(BUILD)/obj/prio.o
$(BUILD)/tests/test_apply: $(BUILD)/obj/apply.o $(BUILD)/obj/mem.o
$(BUILD)/tests/test_sentinel: $(BUILD)/obj/sentinel.o $(BUILD)/obj/rconn.o
$(BUILD)/tests/test_visible: $(BUILD)/obj/visible.o $(BUILD)/obj/runtime.o $(BUILD)/obj/prio.o \
                           $(BUILD)/obj/stream.o $(BUILD)/obj/log.o $(BUILD)/obj/lsn.o \
                           $(BUILD)/obj/notify.o
$(BUILD)/tests/test_schema: $(BUILD)/obj/schema.o $(BUILD)/obj/catalog.o $(BUILD)/obj/pubplan.o \
                          $(BUILD)/obj/rules.o \
                          $(BUILD)/obj/rules_eval.o $(BUILD)/obj/jsonpos.o $(BUILD)/obj/runtime.o \
                          $(BUILD)/obj/prio.o $(BUILD)/obj/stream.o $(BUILD)/obj/log.o \
                          $(BUILD)/obj/lsn.o $(BUILD)/obj/notify.o
$(BUILD)/tests/test_%: tests/unit/test_%.c $(BUILD)/obj/mem.o
	@mkdir -p $(dir $@)
	@echo "  CC      $@"
	$(Q)$(CC) $(CPPFLAGS) -DSOURCE_DIR='"$(CURDIR)"' $(CFLAGS) $(WARN) $(LDFLAGS) -MMD -MP -o $@ $^ $(CMOCKA_LIBS) $(LDLIBS)

unit: $(UNIT_BINS)
	$(Q)set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

# The Redis sink against a real Redis named by WALBUST_REDIS (scripts/stack).
$(BUILD)/tests/sink_test: tests/e2e/sink_test.c $(BUILD)/obj/sink.o $(BUILD)/obj/sink_cluster.o \
                          $(BUILD)/obj/redisurl.o \
                          $(BUILD)/obj/cluster.o $(BUILD)/obj/redis_scripts.o $(BUILD)/obj/mem.o \
                          $(BUILD)/obj/rconn.o $(BUILD)/obj/sentinel.o $(BUILD)/obj/batch.o \
                          $(BUILD)/obj/lsn.o
	@mkdir -p $(dir $@)
	@echo "  CC      $@"
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(WARN) $(LDFLAGS) -MMD -MP -o $@ $^ $(CMOCKA_LIBS) $(LDLIBS)

# Everything: unit tests, then pgTAP and end-to-end tests on a local stack.
test: deps $(BUILD)/walbust $(BUILD)/tests/sink_test unit
	$(Q)WALBUST_BIN=$(CURDIR)/$(BUILD)/walbust tests/run

e2e sqltest: deps $(BUILD)/walbust $(BUILD)/tests/sink_test
	$(Q)WALBUST_BIN=$(CURDIR)/$(BUILD)/walbust tests/run $@

ASAN_FLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
# A small quarantine keeps RSS measurements (bigtxn) meaningful under ASan;
# leak checking stays on, and UBSan findings abort.
asan:
	$(Q)ASAN_OPTIONS=quarantine_size_mb=8:detect_leaks=1:abort_on_error=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    $(MAKE) --no-print-directory BUILD=build/asan CFLAGS="$(ASAN_FLAGS)" \
	    LDFLAGS="-fsanitize=address,undefined" test

demo: deps $(BUILD)/walbust
	$(Q)WALBUST_BIN=$(CURDIR)/$(BUILD)/walbust scripts/demo

bench: deps $(BUILD)/walbust $(BUILD)/bench/eval_bench
	$(Q)WALBUST_BIN=$(CURDIR)/$(BUILD)/walbust bench/run

# The rules engine's cost per change, in process (bench/run, rules10k).
$(BUILD)/bench/eval_bench: bench/eval_bench.c $(BUILD)/obj/rules.o $(BUILD)/obj/rules_eval.o \
                           $(BUILD)/obj/jsonpos.o $(BUILD)/obj/rules_audit.o $(BUILD)/obj/lsn.o \
                           $(BUILD)/obj/mem.o
	@mkdir -p $(dir $@)
	@echo "  CC      $@"
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(WARN) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# libFuzzer targets (clang): FUZZ_SECONDS per target, default 60; see tests/fuzz/run.
.PHONY: fuzz
fuzz: deps
	$(Q)tests/fuzz/run

# A deliberately broken walbust (confirms before Redis acknowledges) that
# the fault campaign must catch: build/broken/walbust.
broken:
	$(Q)$(MAKE) --no-print-directory BUILD=build/broken \
	    CFLAGS="-O2 -g -DWALBUST_TEST_BROKEN_CONFIRM" build/broken/walbust

# The randomized fault campaign (tests/faults/README.md) on its own stack;
# faults-broken must find missed invalidations in build/broken/walbust.
FAULT_ROUNDS ?= 20
.PHONY: faults faults-broken faults-tls faults-sentinel faults-sentinel-broken
faults: deps $(BUILD)/walbust
	$(Q)/usr/bin/python3 tests/faults/campaign.py --bin $(CURDIR)/$(BUILD)/walbust \
	    --rounds $(FAULT_ROUNDS)

# The campaign against a 3-master Redis Cluster (scripts/cluster).
faults-cluster: deps $(BUILD)/walbust
	$(Q)/usr/bin/python3 tests/faults/campaign.py --bin $(CURDIR)/$(BUILD)/walbust \
	    --cluster --rounds $(FAULT_ROUNDS)

# The campaign with walbust reaching Redis over mutual TLS (rediss://).
faults-tls: deps $(BUILD)/walbust
	$(Q)/usr/bin/python3 tests/faults/campaign.py --bin $(CURDIR)/$(BUILD)/walbust \
	    --tls --rounds $(FAULT_ROUNDS)

# The campaign against a Sentinel deployment (scripts/sentinel: a master, a
# replica, three Sentinels) with redis+sentinel://...?replicas=1: manual
# failovers and kill -9 of the master under the write storm.
faults-sentinel: deps $(BUILD)/walbust
	$(Q)/usr/bin/python3 tests/faults/campaign.py --bin $(CURDIR)/$(BUILD)/walbust \
	    --sentinel --rounds $(FAULT_ROUNDS)

faults-broken: deps broken
	$(Q)/usr/bin/python3 tests/faults/campaign.py --broken

# The same proof against Sentinel: frozen and killed masters must lose the
# broken build's held batches (3 rounds of sentinel_master_held/walbust_kill9).
faults-sentinel-broken: deps broken
	$(Q)/usr/bin/python3 tests/faults/campaign.py --sentinel --broken

format:
	clang-format -i cdc/*.c cdc/*.h tests/unit/*.c

clean:
	rm -rf build

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/tests/*.d)
