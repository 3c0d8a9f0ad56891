--[[
  Confirm a reservation (payment received). Idempotent; a reservation found past its deadline
  is expired here and then, so its stock comes back even before the sweeper runs.

  KEYS[1] sale hash   KEYS[2] order hash   KEYS[3] deadlines zset
  KEYS[4] events stream   KEYS[5] buyers hash
  ARGV[1] now (ms)    ARGV[2] order id     ARGV[3] channel id   ARGV[4] payment ref
  Returns {code, status, expires_at_ms}
    code  0 = confirmed now   1 = already confirmed or delivered (replay)
         -7 = no such order for this channel   -8 = reservation expired
         -9 = order was cancelled   -19 = order was refunded
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, order_key, deadlines_key, events_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, order_id, channel, payment_ref = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]

--!include release

local order = rcall("HMGET", order_key, "ch", "status", "exp", "qty", "user")
if not order[1] or order[1] ~= channel then
  return {-7, "", 0}
end
local status, expires_at = order[2], tonumber(order[3])
if status == "confirmed" or status == "delivered" then
  return {1, status, expires_at}
elseif status == "cancelled" then
  return {-9, status, expires_at}
elseif status == "refunded" then
  return {-19, status, expires_at}
elseif status == "expired" then
  return {-8, status, expires_at}
end
if now >= expires_at then
  release_reservation(sale_key, order_key, deadlines_key, events_key, buyers_key,
                      order_id, "expired", now)
  return {-8, "expired", expires_at}
end
local qty = tonumber(order[4])
rcall("HSET", order_key, "status", "confirmed", "pay", payment_ref, "confirmed_at", now)
rcall("HINCRBY", sale_key, "reserved", -qty)
rcall("HINCRBY", sale_key, "confirmed", qty)
rcall("ZREM", deadlines_key, order_id)
rcall("XADD", events_key, "*", "t", "confirmed", "o", order_id, "ch", channel, "u", order[5],
      "q", qty, "at", now, "exp", expires_at, "pay", payment_ref)
return {0, "confirmed", expires_at}
