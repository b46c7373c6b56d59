// walbust-cache.js: cache-aside without the read/invalidate race (Node.js).
//
// A small client for walbust's freshness protocol (docs/freshness.md,
// docs/freshness.md) over an ioredis client and node-postgres:
//
//   const Redis = require('ioredis');
//   const { Client } = require('pg');
//   const { WalbustCache } = require('./walbust-cache');
//
//   const cache = new WalbustCache(new Redis());   // slot "walbust", tags "tag:"
//   const user = await cache.getOrFill('user:42', async () => {
//     const { rows } = await db.query('SELECT row_to_json(u)::text AS j FROM users u WHERE id = $1', [42]);
//     return rows.length ? rows[0].j : 'null';
//   }, { ttl: 300, tags: ['user:42'] });
//
//   // read-your-writes: commit, then wait until walbust has applied it
//   await db.query('BEGIN');
//   await db.query("UPDATE users SET name = 'Ada' WHERE id = 42");
//   await cache.commitAndWait(db, 5000);           // COMMIT + wait; false on timeout
//
// getOrFill: walbust_get answers hit (return it), lease (this caller loads
// and fills with walbust_fill, which stores only if no invalidation revoked
// the lease meanwhile), or wait (another caller is loading: poll again with
// backoff, at most until the hint). Past maxWaitMs the loader runs uncached.
// Stale (rules "stale"): walbust marked the key stale instead of deleting it;
// one caller gets ['stale', old, token] and rebuilds (loads, fills with the
// token, returns the new value), the others get the old value at once until
// the rebuild lands or the grace period ends (docs/freshness.md).
//
// Tags: the key joins each tag set <tagPrefix><tag> BEFORE the loader reads
// the database, so a change that walbust invalidates through the tag also
// deletes the key and revokes the lease. Adding it after the fill leaves a
// window in which a stale value survives (see docs/freshness.md).
//
// Redis 7: FCALL on the function library (load it with
// scripts/load-redis-functions). Redis 6.2: EVALSHA of redis/walbust_eval.lua
// (ioredis loads it on NOSCRIPT). mode 'auto' picks FCALL when the library is
// loaded.
'use strict';

const fs = require('fs');
const path = require('path');

const LEASE_PREFIX = '\0walbust-lease:';
const EVAL_SCRIPT = path.join(__dirname, '..', '..', 'redis', 'walbust_eval.lua');

/** True when a value read with a plain GET is a lease marker (a miss). */
function isLeaseMarker(value) {
  if (value === null || value === undefined) return false;
  const s = Buffer.isBuffer(value) ? value.toString('latin1') : String(value);
  return s.startsWith(LEASE_PREFIX);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class WalbustCache {
  /**
   * redis: an ioredis client. slot: walbust's slot (watermark key
   * walbust:confirmed:<slot>). tagPrefix: the rules' defaults.tag_prefix.
   * leaseMs: how long a loader may take before its fill is refused.
   * maxWaitMs: how long a reader waits for another's fill.
   * mode: 'function' (FCALL), 'eval' (EVALSHA) or 'auto'.
   */
  constructor(redis, { slot = 'walbust', tagPrefix = 'tag:', leaseMs = 2000, maxWaitMs = 5000,
    mode = 'auto', evalScript = EVAL_SCRIPT } = {}) {
    this.redis = redis;
    this.watermarkKey = `walbust:confirmed:${slot}`;
    this.tagPrefix = tagPrefix;
    this.leaseMs = leaseMs;
    this.maxWaitMs = maxWaitMs;
    this.requestedMode = mode;
    this.evalScript = evalScript;
    this.mode = null;
    this.major = null;
    this.stats = { hit: 0, lease: 0, wait: 0, filled: 0, refused: 0, uncached: 0, stale: 0 };
  }

  /** Resolve the mode and the server version (called on first use). */
  async init() {
    if (this.mode) return this;
    const info = await this.redis.info('server');
    this.major = parseInt(/redis_version:(\d+)/.exec(info)[1], 10);
    let mode = this.requestedMode;
    if (mode === 'auto') {
      const libs = this.major >= 7
        ? await this.redis.call('FUNCTION', 'LIST', 'LIBRARYNAME', 'walbust') : [];
      mode = libs.length ? 'function' : 'eval';
    }
    if (mode !== 'function' && mode !== 'eval') throw new Error(`mode must be function, eval or auto, not ${mode}`);
    if (mode === 'eval' && !this.redis.walbustEval) {
      this.redis.defineCommand('walbustEval', { numberOfKeys: 1, lua: fs.readFileSync(this.evalScript, 'utf8') });
    }
    this.mode = mode;
    return this;
  }

  /** One protocol call (walbust_get, walbust_fill, walbust_caught_up). */
  async call(name, key, ...args) {
    await this.init();
    if (this.mode === 'function') {
      return this.redis.call(name === 'walbust_caught_up' ? 'FCALL_RO' : 'FCALL', name, 1, key, ...args);
    }
    return this.redis.walbustEval(key, name, ...args);
  }

  /** walbust_get: ['hit', value] | ['lease', token] | ['wait', ms] |
   *  ['stale', old, token] (this caller rebuilds) | ['stale', old]. */
  async get(key, leaseMs = this.leaseMs) {
    return this.call('walbust_get', key, leaseMs);
  }

  /** walbust_fill: true stored, false refused. */
  async fill(key, token, value, ttl) {
    return (await this.call('walbust_fill', key, token, value, ttl)) === 1;
  }

  /** Add key to each tag set; before the database read. The set lives at
   *  least as long as the entry (Redis 7: EXPIRE NX + GT; 6.2: no expiry). */
  async registerTags(key, tags, ttl) {
    if (!tags || tags.length === 0) return;
    await this.init();
    const keep = ttl + Math.floor(this.leaseMs / 1000) + 1;
    const p = this.redis.pipeline();
    for (const tag of tags) {
      const tkey = this.tagPrefix + tag;
      p.sadd(tkey, key);
      if (ttl === 0) p.persist(tkey);
      else if (this.major >= 7) p.expire(tkey, keep, 'NX').expire(tkey, keep, 'GT');
    }
    for (const [err] of await p.exec()) if (err) throw err;
  }

  /**
   * The cached value of key, or loader()'s result (a string) stored for ttl
   * seconds (0: no expiry) when this caller won the lease and nothing
   * invalidated the key meanwhile. A loader result of null/undefined is
   * returned but not cached.
   */
  async getOrFill(key, loader, { ttl = 300, tags = [] } = {}) {
    const deadline = Date.now() + this.maxWaitMs;
    let pause = 2;
    for (;;) {
      const reply = await this.get(key);
      const kind = reply[0];
      let x = reply[1];
      if (kind === 'hit') {
        this.stats.hit++;
        return x;
      }
      if (kind === 'stale') {
        this.stats.stale++;
        if (reply.length < 3) return x; // another caller rebuilds it
        x = reply[2]; // this caller rebuilds: as with a lease
      }
      if (kind === 'lease' || kind === 'stale') {
        if (kind === 'lease') this.stats.lease++;
        await this.registerTags(key, tags, ttl);
        const value = await loader();
        if (value !== null && value !== undefined) {
          const ok = await this.fill(key, x, value, ttl);
          this.stats[ok ? 'filled' : 'refused']++;
        }
        return value;
      }
      this.stats.wait++;
      const left = deadline - Date.now();
      if (left <= 0) {
        this.stats.uncached++;
        return loader();
      }
      await sleep(Math.min(pause, Number(x), left));
      pause = Math.min(pause * 2, 50);
    }
  }

  /** True when walbust's watermark has reached lsn ("X/X"). */
  async caughtUp(lsn) {
    return (await this.call('walbust_caught_up', this.watermarkKey, lsn)) === 1;
  }

  /** Wait until walbust has applied everything up to lsn; false on timeout. */
  async waitCaughtUp(lsn, timeoutMs = 5000) {
    const deadline = Date.now() + timeoutMs;
    let pause = 2;
    for (;;) {
      if (await this.caughtUp(lsn)) return true;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await sleep(Math.min(pause, left));
      pause = Math.min(pause * 2, 50);
    }
  }

  /**
   * An LSN at or after the end of every transaction committed before this
   * call (call it after COMMIT returned). pg_current_wal_insert_lsn() is past
   * the commit record even with synchronous_commit=off.
   */
  static async commitLsn(pg) {
    const { rows } = await pg.query('SELECT pg_current_wal_insert_lsn()::text AS lsn');
    return rows[0].lsn;
  }

  /** COMMIT the open transaction on pg, then waitCaughtUp on its LSN. */
  async commitAndWait(pg, timeoutMs = 5000) {
    await pg.query('COMMIT');
    return this.waitCaughtUp(await WalbustCache.commitLsn(pg), timeoutMs);
  }
}

module.exports = { WalbustCache, isLeaseMarker, LEASE_PREFIX };
