-- tag_invalidate.lua: invalidate one cache tag atomically.
--
-- KEYS[1]  the tag set (e.g. "tag:user:42"); its members are cache key names
-- ARGV[1]  optional: "del" to delete with DEL instead of UNLINK
--
-- Deletes every member of the set, then the set itself, and returns the
-- number of keys deleted (members that existed, plus the set). A missing
-- tag returns 0. A key of another type at the tag name is deleted as well
-- (it lives in the tag namespace, and deleting cache data is the safe
-- direction) and counts as 1.
--
-- The set is walked with SSCAN and members are deleted in chunks of at most
-- 1000 keys, so a tag with millions of members never builds one huge Lua
-- table or argument list. Being a script, the whole run is atomic: no reader
-- sees a half-invalidated tag, and no member added concurrently is missed.
-- walbust sends this file's text (embedded at build time) with SCRIPT LOAD
-- and calls it with EVALSHA.
local tag = KEYS[1]
local del = 'UNLINK'
if ARGV[1] == 'del' then
    del = 'DEL'
end

local kind = redis.call('TYPE', tag)['ok']
if kind == 'none' then
    return 0
end
if kind ~= 'set' then
    return redis.call(del, tag)
end

local deleted = 0
local cursor = '0'
repeat
    local page = redis.call('SSCAN', tag, cursor, 'COUNT', 1000)
    cursor = page[1]
    local members = page[2]
    for first = 1, #members, 1000 do
        local last = math.min(first + 999, #members)
        deleted = deleted + redis.call(del, unpack(members, first, last))
    end
until cursor == '0'

return deleted + redis.call(del, tag)
