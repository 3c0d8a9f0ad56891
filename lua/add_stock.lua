--[[
  Add one committed key import to the stock of a sale (or of one of its stock buckets: each
  bucket gets its share under the same import id), at most once per import id and bucket.

  KEYS[1] sale hash   KEYS[2] set of applied import ids (of this bucket)
  ARGV[1] import id   ARGV[2] number of keys added here
  Returns {code, total}: code 0 = added, 1 = this import was already added,
          -4 = no such sale (see core.scripts.ReturnCode)
  Adding units bumps the bucket's `restocks` counter; any import clears its `drained_until`
  mark (see lua/mark_drained.lua), even one that gave this bucket no share.
]]
local rcall = redis.call
local sale_key, imports_key = KEYS[1], KEYS[2]
if rcall("HEXISTS", sale_key, "start") == 0 then
  return {-4, 0}
end
if rcall("SADD", imports_key, ARGV[1]) == 0 then
  return {1, tonumber(rcall("HGET", sale_key, "total"))}
end
local n = tonumber(ARGV[2])
rcall("HINCRBY", sale_key, "available", n)
rcall("HDEL", sale_key, "drained_until")  -- also with no share of a small import: the others have
if n > 0 then
  rcall("HINCRBY", sale_key, "restocks", 1)
end
return {0, tonumber(rcall("HINCRBY", sale_key, "total", n))}
