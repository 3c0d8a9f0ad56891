--[[
  Expire one reservation whose deadline has passed. Safe to run from many sweepers at once:
  only the first call for an order finds it "reserved" and gives its stock back.

  KEYS[1] sale hash   KEYS[2] order hash   KEYS[3] deadlines zset
  KEYS[4] events stream   KEYS[5] buyers hash
  ARGV[1] now (ms)    ARGV[2] order id
  Returns 0 = expired now, 1 = nothing to do (already settled, or not yet due)
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, order_key, deadlines_key, events_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, order_id = tonumber(ARGV[1]), ARGV[2]

--!include release

local order = rcall("HMGET", order_key, "status", "exp")
if order[1] ~= "reserved" then
  rcall("ZREM", deadlines_key, order_id)
  return 1
end
if now < tonumber(order[2]) then
  return 1
end
release_reservation(sale_key, order_key, deadlines_key, events_key, buyers_key,
                    order_id, "expired", now)
return 0
