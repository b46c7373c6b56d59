// The Node.js client example (clients/node/walbust-cache.js) against the real
// stack and a real walbust: cache-aside with tags, the t0-t3 race refused
// through both FCALL and EVALSHA, a stampede on one cold key, read-your-writes,
// stale-while-revalidate (one rebuild, the old value for everyone else), and
// plain-GET marker recognition.
//
// Run: node --test tests/freshness/   (env from scripts/stack; WALBUST_BIN)
// Dependencies come from clients/node (npm ci --prefix clients/node).
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');

const ROOT = path.resolve(__dirname, '..', '..');
const dep = createRequire(path.join(ROOT, 'clients', 'node', 'package.json'));
const Redis = dep('ioredis');
const { Client } = dep('pg');
const { WalbustCache, isLeaseMarker } = require(path.join(ROOT, 'clients', 'node', 'walbust-cache.js'));

const DB = 'freshness_node';
const SLOT = DB;
const RDB = 14;
const PGHOST = process.env.PGHOST || '127.0.0.1';
const PGPORT = Number(process.env.PGPORT || 5432);
const REDIS_PORT = Number(process.env.REDIS_PORT || 6379);
const STACK_DIR = process.env.STACK_DIR || '/tmp';
const BIN = process.env.WALBUST_BIN || path.join(ROOT, 'build', 'walbust');

let walbust;
let logPath;
let pg;
let redis;

const pgConnect = async (database) => {
  const c = new Client({ host: PGHOST, port: PGPORT, user: 'postgres', database });
  await c.connect();
  return c;
};

async function waitUntil(fn, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

// The barrier: once walbust invalidated barrier:<token>, everything committed
// before that row was applied (commit order).
async function barrier() {
  const token = `${process.hrtime.bigint()}`;
  await redis.set(`barrier:${token}`, '1');
  await pg.query('INSERT INTO walbust_barrier(token) VALUES ($1)', [token]);
  await waitUntil(async () => (await redis.exists(`barrier:${token}`)) === 0, 20000, 'barrier invalidation');
}

async function rowV(id) {
  const { rows } = await pg.query('SELECT v::text AS v FROM items WHERE id = $1', [id]);
  return rows[0].v;
}

before(async () => {
  const admin = await pgConnect('postgres');
  const slots = await admin.query('SELECT slot_name FROM pg_replication_slots WHERE database = $1 OR slot_name = $2', [DB, SLOT]);
  for (const { slot_name: s } of slots.rows) await admin.query('SELECT pg_drop_replication_slot($1)', [s]);
  await admin.query(`DROP DATABASE IF EXISTS ${DB} WITH (FORCE)`);
  await admin.query(`CREATE DATABASE ${DB}`);
  await admin.end();
  pg = await pgConnect(DB);
  await pg.query(`CREATE TABLE items(id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0);
    CREATE TABLE docs(id int PRIMARY KEY, body text);
    CREATE TABLE walbust_barrier(id bigserial PRIMARY KEY, token text);
    INSERT INTO items SELECT g, 0 FROM generate_series(1, 10) g;
    CREATE PUBLICATION walbust FOR TABLE items, docs, walbust_barrier;`);

  redis = new Redis({ port: REDIS_PORT, db: RDB });
  await redis.flushdb();
  const out = execFileSync(path.join(ROOT, 'scripts', 'load-redis-functions'), ['-p', String(REDIS_PORT)]);
  assert.equal(out.toString().trim(), 'walbust');

  const rules = {
    defaults: { tag_prefix: 'tag:' },
    rules: [
      { table: 'items', keys: ['item:{id}'], tags: ['item:{id}'], stale: ['page:{id}'], stale_grace: 30 },
      { table: 'docs', tags: ['doc:{id}'] },
      { table: 'walbust_barrier', on: ['insert'], keys: ['barrier:{token}'] },
    ],
  };
  const dir = fs.mkdtempSync(path.join(STACK_DIR, 'walbust-node-'));
  const rulesPath = path.join(dir, 'rules.json');
  fs.writeFileSync(rulesPath, JSON.stringify(rules));
  logPath = path.join(dir, 'walbust.log');
  const log = fs.openSync(logPath, 'a');
  walbust = spawn(BIN, ['run', '--pg', `host=${PGHOST} port=${PGPORT} user=postgres dbname=${DB}`,
    '--rules', rulesPath, '--slot', SLOT, '--redis', `redis://127.0.0.1:${REDIS_PORT}/${RDB}`,
    '--metrics', 'off', '--create-slot'], { stdio: ['ignore', log, log] });
  await waitUntil(() => {
    if (walbust.exitCode !== null) throw new Error(`walbust exited: ${fs.readFileSync(logPath, 'utf8')}`);
    return fs.readFileSync(logPath, 'utf8').includes('streaming from');
  }, 20000, 'walbust to stream');
});

after(async () => {
  if (walbust && walbust.exitCode === null) {
    const exited = new Promise((resolve) => walbust.once('exit', resolve));
    walbust.kill('SIGTERM');
    assert.equal(await exited, 0, 'walbust exit status on SIGTERM');
  }
  if (pg) {
    await pg.query('SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active', [SLOT]);
    await pg.end();
  }
  if (redis) redis.disconnect();
});

test('cache-aside: one load, then hits; tags registered before the load', async () => {
  const cache = new WalbustCache(redis, { slot: SLOT });
  let loads = 0;
  const loader = async () => {
    loads++;
    assert.deepEqual(await redis.smembers('tag:item:1'), ['item:1']); // member before the read
    return rowV(1);
  };
  assert.equal(await cache.getOrFill('item:1', loader, { ttl: 60, tags: ['item:1'] }), '0');
  assert.equal(await cache.getOrFill('item:1', loader, { ttl: 60, tags: ['item:1'] }), '0');
  assert.equal(loads, 1);
  assert.equal(cache.mode, 'function');
  assert.ok((await redis.ttl('tag:item:1')) > 60);
  await pg.query('UPDATE items SET v = 1 WHERE id = 1');
  await barrier();
  assert.equal(await redis.exists('item:1', 'tag:item:1'), 0); // walbust removed entry and tag
  assert.equal(await cache.getOrFill('item:1', loader, { ttl: 60, tags: ['item:1'] }), '1');
});

for (const mode of ['function', 'eval']) {
  test(`t0-t3 race: a stale fill is refused (${mode})`, async () => {
    const cache = new WalbustCache(redis, { slot: SLOT, mode });
    await redis.del('item:2');
    const [kind, token] = await cache.get('item:2'); // t0: miss, lease
    assert.equal(kind, 'lease');
    const old = await rowV(2); // t0: read
    const marker = await redis.get('item:2');
    assert.ok(isLeaseMarker(marker), 'a plain GET recognises the marker');
    assert.ok(isLeaseMarker(await redis.getBuffer('item:2')));
    await pg.query('UPDATE items SET v = v + 1 WHERE id = 2'); // t1: commit
    await barrier(); //       ... and walbust invalidates
    assert.equal(await redis.exists('item:2'), 0);
    assert.equal(await cache.fill('item:2', token, old, 60), false); // t2: refused
    assert.equal(await redis.get('item:2'), null); // t3: nothing stale
    const now = await rowV(2);
    assert.notEqual(now, old);
    assert.equal(await cache.getOrFill('item:2', () => rowV(2), { ttl: 60 }), now);
    assert.equal(cache.mode, mode);
    assert.equal(await redis.get('item:2'), now);
    // Naive cache-aside in the same interleaving stores the old value.
    await redis.del('item:3');
    const naiveOld = await rowV(3);
    await pg.query('UPDATE items SET v = v + 1 WHERE id = 3');
    await barrier();
    await redis.set('item:3', naiveOld, 'EX', 60);
    assert.notEqual(await redis.get('item:3'), await rowV(3));
    await redis.del('item:3');
  });
}

test('stampede: 200 concurrent readers of a cold key, one database read', async () => {
  const cache = new WalbustCache(redis, { slot: SLOT });
  await pg.query('UPDATE items SET v = 42 WHERE id = 4');
  await barrier();
  let loads = 0;
  const loader = async () => {
    loads++;
    const { rows } = await pg.query('SELECT v::text AS v, pg_sleep(0.05) FROM items WHERE id = 4');
    return rows[0].v;
  };
  const got = await Promise.all(Array.from({ length: 200 }, () => cache.getOrFill('item:4', loader, { ttl: 60 })));
  assert.deepEqual(new Set(got), new Set(['42']));
  assert.equal(loads, 1);
  console.log(`# node stampede: 200 readers, ${loads} database read, ${cache.stats.wait} wait replies`);
});

test('read-your-writes: commitAndWait, then the cache gives the new row', async () => {
  const cache = new WalbustCache(redis, { slot: SLOT });
  const writer = await pgConnect(DB);
  try {
    for (let n = 1; n <= 20; n++) {
      assert.equal(await cache.getOrFill('item:5', () => rowV(5), { ttl: 60 }), String(n - 1));
      await writer.query('BEGIN');
      await writer.query('UPDATE items SET v = $1 WHERE id = 5', [n]);
      assert.equal(await cache.commitAndWait(writer, 10000), true);
      assert.equal(await cache.getOrFill('item:5', () => rowV(5), { ttl: 60 }), String(n));
    }
    const lsn = await WalbustCache.commitLsn(writer);
    const behind = new WalbustCache(redis, { slot: 'none' });
    assert.equal(await behind.waitCaughtUp(lsn, 200), false); // no watermark: times out
  } finally {
    await writer.end();
  }
});

for (const [i, mode] of [[7, 'function'], [8, 'eval']]) {
  test(`stale while revalidate: one rebuild, the others get the old value (${mode})`, async () => {
    const cache = new WalbustCache(redis, { slot: SLOT, mode });
    const key = `page:${i}`;
    let loads = 0;
    const render = async () => { loads++; return `page v=${await rowV(i)}`; };
    assert.equal(await cache.getOrFill(key, render, { ttl: 60 }), `page v=${await rowV(i)}`);
    const before = await rowV(i);
    await pg.query('UPDATE items SET v = v + 1 WHERE id = $1', [i]);
    await waitUntil(async () => isLeaseMarker(await redis.getBuffer(key)), 20000, 'the page marked stale');
    assert.ok((await redis.pttl(key)) <= 30000); // plain GET: a marker (a miss), gone after the grace
    loads = 0;
    const got = await Promise.all(Array.from({ length: 20 }, () => cache.getOrFill(key, render, { ttl: 60 })));
    assert.equal(loads, 1);
    const fresh = `page v=${await rowV(i)}`;
    assert.ok(got.includes(fresh)); // the rebuilder (later readers may hit its fill)
    assert.ok(got.every((v) => v === fresh || v === `page v=${before}`), got.join(','));
    assert.equal(await cache.getOrFill(key, render, { ttl: 60 }), fresh); // the rebuild landed
    assert.equal(loads, 1);
  });
}
