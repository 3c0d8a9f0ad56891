--[[
  Step 2 of a transfer between stock buckets: add the withdrawn units to the recipient
  bucket, at most once per transfer id (the gateway and the recovery pass may both try).

  KEYS[1] recipient's sale hash   KEYS[2] recipient's set of deposited transfer ids
  ARGV[1] transfer id   ARGV[2] units (as withdraw.lua recorded them)
  Returns 0 = deposited now, 1 = this transfer was already deposited, -4 = no such sale
  (mirrored by core.scripts.ReturnCode)
  Deposited units bump the bucket's `restocks` counter and clear its `drained_until` mark.
]]
local rcall = redis.call
local sale_key, deposits_key = KEYS[1], KEYS[2]
if rcall("HEXISTS", sale_key, "start") == 0 then
  return -4
end
if rcall("SADD", deposits_key, ARGV[1]) == 0 then
  return 1
end
local units = tonumber(ARGV[2])
rcall("HINCRBY", sale_key, "available", units)
rcall("HINCRBY", sale_key, "total", units)
rcall("HINCRBY", sale_key, "restocks", 1)
rcall("HDEL", sale_key, "drained_until")
return 0
