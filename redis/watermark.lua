-- watermark.lua: move walbust's confirmed-position watermark forward only.
-- KEYS[1] walbust:confirmed:<slot>; ARGV[1] the LSN "X/X"; ARGV[2] "reset"
-- (a new slot after a lost one) sets it even when lower. Returns 1 when
-- set, 0 when the key already holds that LSN or a newer one (an older
-- instance or a replay must not move it back; docs/operations.md).
local function lsn(s)
    local hi, lo = string.match(s or '', '^(%x+)/(%x+)$')
    if hi == nil then return nil end
    return tonumber(hi, 16), tonumber(lo, 16)
end
local nh, nl = lsn(ARGV[1])
if nh == nil then return redis.error_reply('ERR watermark.lua: not an LSN: ' .. tostring(ARGV[1])) end
if ARGV[2] ~= 'reset' then
    local ch, cl = lsn(redis.call('GET', KEYS[1]))
    if ch ~= nil and (ch > nh or (ch == nh and cl >= nl)) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
