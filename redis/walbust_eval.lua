-- walbust_eval.lua: GENERATED from redis/walbust.lua by
-- `scripts/load-redis-functions --gen-eval`; do not edit (edit walbust.lua).
--
-- The walbust freshness calls as one EVAL/EVALSHA script, for Redis 6.2
-- (no Functions). Same code, same replies as the function library; the
-- function name is the first argument after the key:
--   EVALSHA <sha> 1 <key> walbust_get <lease_ms>
--   EVALSHA <sha> 1 <key> walbust_fill <token> <value> <ttl_s>
--   EVALSHA <sha> 1 <watermark_key> walbust_caught_up <lsn>
-- See redis/walbust.lua and docs/freshness.md.
if redis.replicate_commands then
    redis.replicate_commands() -- Redis 6.2: replicate effects (TIME before SET)
end

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

if WALBUST_CALLS[ARGV[1]] == nil then
    return redis.error_reply("ERR walbust: first argument must be walbust_get, walbust_fill " ..
        "or walbust_caught_up, got '" .. tostring(ARGV[1]) .. "'")
end
return walbust_call(ARGV[1], KEYS, {unpack(ARGV, 2)})
