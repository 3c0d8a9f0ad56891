--[[
  Cancel a reservation and give its stock back. Idempotent.

  KEYS[1] sale hash   KEYS[2] order hash   KEYS[3] deadlines zset
  KEYS[4] events stream   KEYS[5] buyers hash
  ARGV[1] now (ms)    ARGV[2] order id     ARGV[3] channel id
  Returns {code, status}
    code  0 = cancelled now   1 = already cancelled or expired (stock already back)
         -7 = no such order for this channel   -10 = confirmed orders can't be cancelled
         -19 = the order was refunded
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, order_key, deadlines_key, events_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, order_id, channel = tonumber(ARGV[1]), ARGV[2], ARGV[3]

--!include release

local order = rcall("HMGET", order_key, "ch", "status")
if not order[1] or order[1] ~= channel then
  return {-7, ""}
end
local status = order[2]
if status == "cancelled" or status == "expired" then
  return {1, status}
elseif status == "refunded" then
  return {-19, status}
elseif status ~= "reserved" then
  return {-10, status}
end
release_reservation(sale_key, order_key, deadlines_key, events_key, buyers_key,
                    order_id, "cancelled", now)
return {0, "cancelled"}
