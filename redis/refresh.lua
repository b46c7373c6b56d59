-- refresh.lua: walbust's write-through re-warming and stale marking
-- (docs/rules.md "Refresh" and "Stale while revalidate").
--
-- Refresh (store the new row, fenced):
--   KEYS[1] the cache key, KEYS[2] its fence key (walbust:fence:...)
--   ARGV    "json" | "hash", the commit LSN "X/X", TTL seconds (0: none),
--           the row as a JSON object (column -> text or null)
--   Stores the row unless the fence holds a newer commit's LSN (a replay
--   after a crash, a standby taking over, another walbust writing the same
--   target): returns 1 stored, 0 refused. A commit's own LSN may store
--   again (several changes of one transaction, in order). "json" SETs the
--   object text; "hash" replaces the key with a hash of the non-null
--   columns. Overwriting the key also revokes a lease marker in it, so a
--   cache-aside filler's walbust_fill is refused. The fence keeps the LSN
--   (with the same TTL as the value).
--
-- Stale (serve the old value while one reader rebuilds it):
--   KEYS[1] the cache key
--   ARGV    "stale", "", grace seconds, ""
--   A plain value becomes the stale marker
--     "\0walbust-lease:stale:0::" .. value      expiring after the grace
--   which walbust_get (redis/walbust.lua) serves as {"stale", value[, token]}
--   and plain GET readers see as a lease marker (a miss). A stale marker
--   already there loses its rebuild lease (the rebuild read older data) and
--   keeps its expiry; a lease marker or a non-string key is deleted (as an
--   invalidation would). Returns 1 when the key was changed, else 0.
local LEASE_PREFIX = '\0walbust-lease:'
local STALE_PREFIX = LEASE_PREFIX .. 'stale:'
local mode = ARGV[1]

local function lsn_parts(s)
    local hi, lo = string.match(s or '', '^(%x+)/(%x+)$')
    if hi == nil then
        return nil
    end
    return tonumber(hi, 16), tonumber(lo, 16)
end

if mode == 'stale' then
    local key = KEYS[1]
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'none' then
        return 0
    end
    if kind ~= 'string' then
        redis.call('UNLINK', key)
        return 1
    end
    local v = redis.call('GET', key)
    if string.sub(v, 1, #STALE_PREFIX) == STALE_PREFIX then
        local at = string.match(v, '^%d+:[^:]*:()', #STALE_PREFIX + 1)
        if at == nil then
            redis.call('UNLINK', key)
            return 1
        end
        redis.call('SET', key, STALE_PREFIX .. '0::' .. string.sub(v, at), 'KEEPTTL')
        return 1
    end
    if string.sub(v, 1, #LEASE_PREFIX) == LEASE_PREFIX then
        redis.call('UNLINK', key) -- a rebuild lease: revoke it
        return 1
    end
    redis.call('SET', key, STALE_PREFIX .. '0::' .. v, 'EX', tonumber(ARGV[3]))
    return 1
end

local key, fence = KEYS[1], KEYS[2]
local th, tl = lsn_parts(ARGV[2])
if th == nil then
    return redis.error_reply('ERR walbust refresh: not an LSN: ' .. tostring(ARGV[2]))
end
local held = redis.call('GET', fence)
if held then
    local fh, fl = lsn_parts(held)
    if fh ~= nil and (fh > th or (fh == th and fl > tl)) then
        return 0
    end
end
local ttl = tonumber(ARGV[3])
if mode == 'hash' then
    local row = cjson.decode(ARGV[4])
    local args = {}
    for col, val in pairs(row) do
        if val ~= cjson.null then
            args[#args + 1] = col
            args[#args + 1] = val
        end
    end
    redis.call('UNLINK', key)
    if #args > 0 then
        redis.call('HSET', key, unpack(args))
        if ttl > 0 then
            redis.call('EXPIRE', key, ttl)
        end
    end
elseif ttl > 0 then
    redis.call('SET', key, ARGV[4], 'EX', ttl)
else
    redis.call('SET', key, ARGV[4])
end
if ttl > 0 then
    redis.call('SET', fence, ARGV[2], 'EX', ttl)
else
    redis.call('SET', fence, ARGV[2])
end
return 1
