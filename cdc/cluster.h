/*
 * cluster.h — a small Redis Cluster client: key slots, the slot map, and a
 * pipelined command queue routed to the masters.
 *
 * Debian's hiredis (0.14) has no cluster support, so this module does the
 * routing itself. The pure part (cluster_crc16, cluster_keyslot,
 * cluster_parse_redirect, cluster_parse_slots) has no I/O and is unit-tested.
 *
 * The I/O part keeps one connection (rconn.c) per master, learnt from
 * CLUSTER SLOTS asked of any reachable node (the seeds first). Commands are
 * queued with cluster_append_key() (routed by the CRC16 slot of one key,
 * hash tags honoured) or cluster_append_node() (a command for one node, such
 * as SCAN), and cluster_exec() sends them: every node's pipeline is written
 * first, then every node's replies are read, so a batch costs one round
 * trip whatever the number of masters. A -MOVED reply updates the slot map
 * (and the whole map is refreshed before the next round); an -ASK reply
 * re-sends that one command as ASKING + command to the importing node. A
 * batch succeeds only when every command got a reply that is not an error.
 * -TRYAGAIN, -CLUSTERDOWN, I/O errors and timeouts fail the batch (the
 * caller retries with backoff, docs/guarantees.md guarantee 3); an I/O error drops that node's
 * connection and schedules a map refresh, which is how a failover (a
 * replica promoted in place of a dead master) is followed.
 *
 * Node ids (cluster_master_id(), cluster_append_node()) are stable for the
 * lifetime of a Cluster: a node that leaves the map keeps its id but is no
 * longer a master. The module does not log; errors go to cluster_errstr().
 */
#ifndef WALBUST_CLUSTER_H
#define WALBUST_CLUSTER_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CLUSTER_SLOTS 16384

/* ---- pure helpers ------------------------------------------------------ */

/* CRC16-CCITT (XMODEM: poly 0x1021, init 0), the checksum Redis Cluster
 * uses. cluster_crc16("123456789", 9) == 0x31C3. */
uint16_t cluster_crc16(const char *buf, size_t len);

/* The hash slot (0..16383) of a key: CRC16 of the key mod 16384, or of the
 * bytes between the first '{' and the next '}' when that span is not empty
 * (a hash tag). */
unsigned cluster_keyslot(const char *key, size_t len);

typedef enum ClusterRedirect {
    CLUSTER_REDIRECT_NONE,
    CLUSTER_REDIRECT_MOVED,
    CLUSTER_REDIRECT_ASK,
} ClusterRedirect;

/* Parse an error reply "MOVED <slot> <host>:<port>" or "ASK ...". Returns
 * the kind (NONE for any other text, including a malformed redirect) and
 * fills slot, host (hostlen bytes, NUL-terminated, IPv6 unbracketed) and
 * port. An empty host (a node that does not know its address) is returned
 * as "". */
ClusterRedirect cluster_parse_redirect(const char *err, unsigned *slot, char *host, size_t hostlen,
                                       int *port);

/* One master's slot range from CLUSTER SLOTS. */
typedef struct ClusterRange {
    unsigned first, last; /* inclusive */
    char host[256];       /* "" when the node did not know its address */
    int port;
    unsigned replicas; /* replicas listed for the range */
} ClusterRange;

/* Parse a CLUSTER SLOTS reply into ranges (a malloc'd array the caller
 * frees; *n gets its length). Replicas are ignored. Returns NULL with a
 * reason in err when the reply does not have the documented shape or
 * covers no slot. Aborts on out of memory. */
ClusterRange *cluster_parse_slots(const redisReply *r, size_t *n, char *err, size_t errlen);

/* ---- the client -------------------------------------------------------- */

typedef struct ClusterConfig {
    char seeds[1024]; /* "host:port,host:port,[v6]:port" */
    char user[128];   /* "" for the default user */
    char password[256];
    bool has_password;
    int connect_timeout_ms; /* > 0 */
    int command_timeout_ms; /* > 0 */
    struct RconnTls *tls;   /* rediss+cluster: every node over TLS (borrowed) */
    char sni[256];          /* TLS server name for every node; "" = its host */
    int replicas;           /* ?replicas=N, 0 when absent */
} ClusterConfig;

typedef struct Cluster Cluster;

/* Create a client (no connection yet). cfg is copied. Aborts on OOM. */
Cluster *cluster_new(const ClusterConfig *cfg);

/* Close every connection and free. Accepts NULL. */
void cluster_free(Cluster *c);

/* Load the slot map (cluster_refresh) and connect to every master (AUTH,
 * PING). Returns 0, or -1 with cluster_errstr() saying which node failed. */
int cluster_connect(Cluster *c) __attribute__((warn_unused_result));

/* Ask CLUSTER SLOTS of the known nodes (current masters, then the seeds,
 * then every node ever seen) until one answers with a map covering all
 * 16384 slots, and adopt it. Returns 0 or -1 (cluster_errstr()). */
int cluster_refresh(Cluster *c) __attribute__((warn_unused_result));

/* True when a full slot map is known and every master has a live
 * connection (what the sink reports as "connected"). */
bool cluster_connected(const Cluster *c);

/* Number of distinct masters in the current map, and the node id of the
 * i-th (0 <= i < cluster_master_count()). */
size_t cluster_master_count(const Cluster *c);
int cluster_master_id(const Cluster *c, size_t i);

/* "host:port" of node id (for messages). */
const char *cluster_node_addr(const Cluster *c, int id);

/* Forget queued commands and their replies. */
void cluster_reset(Cluster *c);

/* Queue a command routed by the slot of argv[keyarg]. Arguments are copied.
 * Returns the command's index for cluster_reply(). */
size_t cluster_append_key(Cluster *c, size_t keyarg, int argc, const char **argv,
                          const size_t *lens);

/* Queue a command for node id (not redirected: SCAN, which walks one node's
 * keyspace). Returns the command's index. */
size_t cluster_append_node(Cluster *c, int id, int argc, const char **argv, const size_t *lens);

/* replicas == 0: queue `WAIT 1 timeout_ms` for every master that has a
 * replica, so the exec returns only once a replica has the writes sent
 * before it on that connection, or the timeout passed (WAIT then answers
 * 0, which is not an error: replication is asynchronous, this narrows the
 * window in which an acknowledged write can die with its master).
 * replicas > 0 (?replicas=N): queue `WAIT N timeout_ms` for every master;
 * the caller checks each reply (cluster_reply) is at least N. Returns the
 * index of the first WAIT queued (== cluster_queued() before the call). */
size_t cluster_append_wait(Cluster *c, int replicas, int timeout_ms);

/* Number of queued commands. */
size_t cluster_queued(const Cluster *c);

/* Send every queued command that has no reply yet, following MOVED and ASK.
 * Returns 0 when every command has a reply that is not an error; -1
 * otherwise (cluster_errstr() names the first failing command and node).
 * Replies already received are kept, so a second call re-sends only the
 * commands that failed. */
int cluster_exec(Cluster *c) __attribute__((warn_unused_result));

/* The reply of command i after a successful cluster_exec(); owned by the
 * cluster until cluster_reset(). */
const redisReply *cluster_reply(const Cluster *c, size_t i);

/* After a failed cluster_exec(): did every command without a reply fail
 * only because its node refused it with -OOM (maxmemory reached under
 * noeviction), so every other command was applied? And was command i one
 * of those? */
bool cluster_only_oom(const Cluster *c);
bool cluster_refused_oom(const Cluster *c, size_t i);

/* Command i for messages: `INCR "key"`. */
const char *cluster_command_name(const Cluster *c, size_t i);

const char *cluster_errstr(const Cluster *c);

#endif
