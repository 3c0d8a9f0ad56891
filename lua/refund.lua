--[[
  Ask for an order's refund. Idempotent.
  A reserved order holds no card key (keys go only to confirmed orders), so its refund is
  settled here and then: its units go back to the stock exactly once (as a cancel). A
  confirmed or delivered order may have keys committed in PostgreSQL by a worker at this very
  moment, so PostgreSQL decides (core/refunds.py, under the order's row lock) whether its
  units come back or its keys are voided; this script only marks the refund requested (field
  `rf`) and, the first time, adds a `refund` event to the stream, so that a worker completes
  the refund even if the caller dies before it does. refund_finish.lua then applies the
  decision to the ledger.

  KEYS[1] sale hash   KEYS[2] order hash   KEYS[3] deadlines zset
  KEYS[4] events stream   KEYS[5] buyers hash
  ARGV[1] now (ms)    ARGV[2] order id     ARGV[3] channel id
  Returns {code, status, user, qty, created_ms}
    code  0 = refunded now (it was reserved: stock back)   1 = already refunded
          2 = refund requested: settle in PostgreSQL, then refund_finish.lua
         -7 = no such order for this channel   -18 = cancelled or expired: nothing to refund
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, order_key, deadlines_key, events_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, order_id, channel = tonumber(ARGV[1]), ARGV[2], ARGV[3]

--!include release

local order = rcall("HMGET", order_key, "ch", "status", "user", "qty", "created", "rf")
if not order[1] or order[1] ~= channel then
  return {-7, "", "", 0, 0}
end
local status, user, qty, created = order[2], order[3], tonumber(order[4]), tonumber(order[5])
if status == "refunded" then
  return {1, status, user, qty, created}
elseif status == "cancelled" or status == "expired" then
  return {-18, status, user, qty, created}
elseif status == "reserved" then
  release_reservation(sale_key, order_key, deadlines_key, events_key, buyers_key,
                      order_id, "refunded", now)
  rcall("HSET", order_key, "rfo", "returned")
  return {0, "refunded", user, qty, created}
end
-- confirmed or delivered
if not order[6] then
  rcall("HSET", order_key, "rf", now)
  rcall("XADD", events_key, "*", "t", "refund", "o", order_id, "ch", channel, "u", user,
        "q", qty, "at", now, "created", created)
end
return {2, status, user, qty, created}
