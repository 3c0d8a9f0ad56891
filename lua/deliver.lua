--[[
  Mark confirmed orders of one sale delivered, after the worker committed their keys to
  PostgreSQL: one call for a whole batch. Idempotent, so a worker that crashed between commit
  and ack can run it again.

  KEYS[1] sale hash   KEYS[2..n] order hashes (all of that sale)
  ARGV[1] now (ms)
  Returns one code per order, in KEYS order: 0 = delivered now, 1 = already delivered,
          -7 = order unknown to Redis, -11 = order not in a deliverable state (e.g.
          refunded meanwhile: its keys were voided in PostgreSQL, core/refunds.py)
  (see core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key = KEYS[1]
local out, delivered = {}, 0
for i = 2, #KEYS do
  local order_key = KEYS[i]
  local order = rcall("HMGET", order_key, "status", "qty")
  if not order[1] then
    out[#out + 1] = -7
  elseif order[1] == "delivered" then
    out[#out + 1] = 1
  elseif order[1] ~= "confirmed" then
    out[#out + 1] = -11
  else
    rcall("HSET", order_key, "status", "delivered", "delivered_at", ARGV[1])
    delivered = delivered + tonumber(order[2])
    out[#out + 1] = 0
  end
end
if delivered > 0 then
  rcall("HINCRBY", sale_key, "confirmed", -delivered)
  rcall("HINCRBY", sale_key, "delivered", delivered)
end
return out
