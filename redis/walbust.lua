#!lua name=walbust
-- walbust.lua: the `walbust` Redis Function library (Redis 7+), the read side
-- of walbust's freshness protocol (docs/freshness.md).
--
--   FCALL walbust_get       1 <key> <lease_ms>
--       -> {"hit", value} | {"lease", token} | {"wait", ms}
--          | {"stale", value, token} | {"stale", value}
--   FCALL walbust_fill      1 <key> <token> <value> <ttl_s>
--       -> 1 stored | 0 refused (the lease was revoked, expired or replaced)
--   FCALL walbust_caught_up 1 <watermark_key> <lsn>      (also FCALL_RO)
--       -> 1 when the watermark (walbust's confirmed LSN) is >= lsn, else 0
--
-- A lease is a marker value stored in the cache key itself:
--   "\0walbust-lease:" .. token        with a PX <lease_ms> expiry
-- so walbust's ordinary UNLINK of the key (on a committed change) revokes any
-- lease in flight, and walbust_fill, which stores only while the key still
-- holds *its* marker, refuses the value the reader read before that change.
-- One key per call: works on Redis Cluster without hash tags.
--
-- A plain GET client recognises a marker by its first byte, NUL, followed by
-- "walbust-lease:"; it must treat such a value as a miss. walbust_fill refuses
-- to store a value that starts with that prefix, so real data never does.
--
-- Stale while revalidate (rules "stale"): instead of deleting, walbust
-- rewrites the value into a stale marker (redis/refresh.lua)
--   "\0walbust-lease:stale:" .. deadline_ms .. ":" .. token .. ":" .. value
-- that expires after the rule's grace period (deadline 0 and an empty token:
-- no rebuild lease yet). walbust_get serves the old value from it: to one
-- caller with a rebuild lease ({"stale", value, token}; it rebuilds and
-- calls walbust_fill with the token), to the others without one
-- ({"stale", value}) until the fill lands, the grace ends, or the rebuild
-- lease (lease_ms) runs out and the next caller gets a new one. A newer
-- change clears the lease, so a rebuild that read older data is refused.
--
-- Load:  scripts/load-redis-functions   (redis-cli -x FUNCTION LOAD REPLACE)
-- Redis 6.2 has no functions: redis/walbust_eval.lua is the same code as an
-- EVAL/EVALSHA script, generated from the CORE section below by
-- `scripts/load-redis-functions --gen-eval`; tests/freshness checks that the
-- two stay identical. Edit the CORE here, never in walbust_eval.lua.

-- @@CORE-BEGIN
local LEASE_PREFIX = '\0walbust-lease:'

-- Count of leases granted since this code was loaded. A function library
-- keeps it between calls; an EVAL script starts at 0 each call (TIME and
-- math.random keep tokens apart there).
local lease_seq = 0

local STALE_PREFIX = LEASE_PREFIX .. 'stale:'

local function is_marker(v)
    return type(v) == 'string' and string.sub(v, 1, #LEASE_PREFIX) == LEASE_PREFIX
end

-- A stale marker's rebuild deadline (ms, 0: none), token and old value, or nil.
local function parse_stale(v)
    if type(v) ~= 'string' or string.sub(v, 1, #STALE_PREFIX) ~= STALE_PREFIX then
        return nil
    end
    local deadline, token, at = string.match(v, '^(%d+):([^:]*):()', #STALE_PREFIX + 1)
    if deadline == nil then
        return nil
    end
    return tonumber(deadline), token, string.sub(v, at)
end

local function new_token()
    lease_seq = lease_seq + 1
    local t = redis.call('TIME')
    return t[1] .. '.' .. t[2] .. '.' .. lease_seq .. '.' .. math.random(1, 2147483646), t
end

-- Serve a stale marker: the old value, with a rebuild lease when none is live.
local function serve_stale(key, lease_ms, deadline, token, value)
    local tok, t = new_token()
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if token ~= '' and now < deadline then
        return {'stale', value}
    end
    redis.call('SET', key, STALE_PREFIX .. (now + lease_ms) .. ':' .. tok .. ':' .. value, 'KEEPTTL')
    return {'stale', value, tok}
end

-- A non-negative integer argument (positive with positive == true), or nil.
local function int_arg(s, positive)
    if type(s) ~= 'string' or not string.match(s, '^%d+$') or #s > 15 then
        return nil
    end
    local n = tonumber(s)
    if positive and n < 1 then
        return nil
    end
    return n
end

local function bad(fn, what, value)
    return redis.error_reply('ERR ' .. fn .. ': ' .. what .. ', got ' ..
        (value == nil and 'nothing' or ("'" .. tostring(value) .. "'")))
end

-- A PostgreSQL LSN "X/X" as its two 32-bit halves (exact in Lua numbers),
-- or nil when the text is not an LSN.
local function parse_lsn(s)
    if type(s) ~= 'string' then
        return nil
    end
    local hi, lo = string.match(s, '^(%x+)/(%x+)$')
    if hi == nil or #hi > 8 or #lo > 8 then
        return nil
    end
    return tonumber(hi, 16), tonumber(lo, 16)
end

local function walbust_get(key, lease_arg)
    local lease_ms = int_arg(lease_arg, true)
    if lease_ms == nil then
        return bad('walbust_get', 'lease_ms must be a positive integer (milliseconds)', lease_arg)
    end
    local v = redis.call('GET', key)
    if v then
        if not is_marker(v) then
            return {'hit', v}
        end
        local deadline, stoken, old = parse_stale(v)
        if deadline ~= nil then
            return serve_stale(key, lease_ms, deadline, stoken, old)
        end
        local ms = redis.call('PTTL', key)
        if ms < 0 then
            ms = lease_ms -- a marker without expiry is never written by walbust_get
        end
        return {'wait', math.max(ms, 1)}
    end
    local token = new_token()
    redis.call('SET', key, LEASE_PREFIX .. token, 'PX', lease_ms, 'NX')
    return {'lease', token}
end

local function walbust_fill(key, token, value, ttl_arg)
    local ttl = int_arg(ttl_arg, false)
    if ttl == nil then
        return bad('walbust_fill', 'ttl_s must be a non-negative integer (seconds, 0: no expiry)', ttl_arg)
    end
    if type(token) ~= 'string' or token == '' then
        return bad('walbust_fill', 'token must be the token walbust_get returned', token)
    end
    if type(value) ~= 'string' then
        return bad('walbust_fill', 'value is missing', value)
    end
    if is_marker(value) then
        return redis.error_reply('ERR walbust_fill: value starts with the reserved lease prefix ' ..
            '"\\0walbust-lease:"; such a value would read as a lease')
    end
    local held = redis.call('GET', key)
    if held ~= LEASE_PREFIX .. token then
        local _, stoken = parse_stale(held)
        if stoken == nil or stoken ~= token then
            return 0 -- revoked, expired, replaced (or a stale marker's other lease)
        end
    end
    if ttl > 0 then
        redis.call('SET', key, value, 'EX', ttl)
    else
        redis.call('SET', key, value)
    end
    return 1
end

local function walbust_caught_up(watermark_key, lsn)
    local th, tl = parse_lsn(lsn)
    if th == nil then
        return bad('walbust_caught_up', 'lsn must be a PostgreSQL LSN like 0/16B3748', lsn)
    end
    local w = redis.call('GET', watermark_key)
    if not w then
        return 0
    end
    local wh, wl = parse_lsn(w)
    if wh == nil then
        return redis.error_reply('ERR walbust_caught_up: watermark key ' .. watermark_key ..
            " holds '" .. w .. "', not an LSN")
    end
    if wh > th or (wh == th and wl >= tl) then
        return 1
    end
    return 0
end

-- name -> {implementation, number of arguments after the key}
local WALBUST_CALLS = {
    walbust_get = {walbust_get, 1},
    walbust_fill = {walbust_fill, 3},
    walbust_caught_up = {walbust_caught_up, 1},
}

local function walbust_call(name, keys, args)
    local call = WALBUST_CALLS[name]
    if #keys ~= 1 then
        return redis.error_reply('ERR ' .. name .. ': takes exactly 1 key, got ' .. #keys)
    end
    if #args ~= call[2] then
        return redis.error_reply('ERR ' .. name .. ': takes ' .. call[2] ..
            ' argument(s) after the key, got ' .. #args)
    end
    return call[1](keys[1], unpack(args))
end
-- @@CORE-END

redis.register_function{
    function_name = 'walbust_get',
    callback = function(keys, args) return walbust_call('walbust_get', keys, args) end,
}
redis.register_function{
    function_name = 'walbust_fill',
    callback = function(keys, args) return walbust_call('walbust_fill', keys, args) end,
}
redis.register_function{
    function_name = 'walbust_caught_up',
    callback = function(keys, args) return walbust_call('walbust_caught_up', keys, args) end,
    flags = {'no-writes'},
}
