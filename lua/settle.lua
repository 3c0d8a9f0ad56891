--[[
  Step 3 of a transfer between stock buckets, run only after deposit.lua answered 0 or 1: the
  donor forgets the transfer and its units leave `transit`. Idempotent.

  KEYS[1] donor's sale hash   KEYS[2] donor's pending transfers hash
  ARGV[1] transfer id
  Returns 0 = settled now, 1 = nothing pending under this id   (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, pending_key = KEYS[1], KEYS[2]
local record = rcall("HGET", pending_key, ARGV[1])
if not record then
  return 1
end
local units = tonumber(string.match(record, "^[^|]*|([^|]*)|"))
rcall("HDEL", pending_key, ARGV[1])
rcall("HINCRBY", sale_key, "transit", -units)
return 0
