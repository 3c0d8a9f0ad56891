--[[
  Apply a refund settled in PostgreSQL (core/refunds.py) to the ledger of the order's bucket,
  exactly once: the status flips to `refunded` in the same script that moves the units.
    outcome "returned" (no key was ever committed to the order): its units go back to
      `available`, from `confirmed`;
    outcome "voided" (its keys were committed, now voided): its units leave `confirmed` or
      `delivered` for `voided` and are never sold again.
  An order already `delivered` here always goes to `voided`, whatever the outcome says:
  delivered in Redis means keys were committed, and a unit whose key may be gone must never
  come back. Ledger invariant: available + reserved + confirmed + delivered + voided = total.
  The buyer's held count drops by the order's quantity either way.

  KEYS[1] sale hash   KEYS[2] order hash   KEYS[3] buyers hash
  ARGV[1] now (ms)    ARGV[2] outcome: "returned" | "voided"
  Returns {code, outcome applied}
    code  0 = applied now   1 = already refunded (nothing done; outcome as applied then)
         -7 = no such order   -11 = the order is not confirmed or delivered
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, order_key, buyers_key = KEYS[1], KEYS[2], KEYS[3]
local now, outcome = tonumber(ARGV[1]), ARGV[2]

local order = rcall("HMGET", order_key, "status", "qty", "user", "rfo", "ch")
local status = order[1]
if not status then
  return {-7, ""}
elseif status == "refunded" then
  return {1, order[4] or ""}
elseif status ~= "confirmed" and status ~= "delivered" then
  return {-11, ""}
end
local qty = tonumber(order[2])
if status == "delivered" then
  outcome = "voided"
end
rcall("HINCRBY", sale_key, status, -qty)
if outcome == "returned" then
  rcall("HINCRBY", sale_key, "available", qty)
  rcall("HINCRBY", sale_key, "restocks", 1)
  rcall("HDEL", sale_key, "drained_until")
else
  outcome = "voided"
  rcall("HINCRBY", sale_key, "voided", qty)
end
rcall("HINCRBY", sale_key, "refunded", qty)
local buyer = order[5] .. ":" .. order[3]  -- users are namespaced by channel (reserve_order)
if tonumber(rcall("HINCRBY", buyers_key, buyer, -qty)) <= 0 then
  rcall("HDEL", buyers_key, buyer)
end
rcall("HSET", order_key, "status", "refunded", "rfo", outcome, "ended", now)
rcall("HDEL", order_key, "rf")
return {0, outcome}
