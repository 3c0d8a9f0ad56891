--[[
  Mark a confirmed order delivered, after the worker committed its keys to PostgreSQL.
  Idempotent, so a worker that crashed between commit and ack can run it again.

  KEYS[1] sale hash   KEYS[2] order hash
  ARGV[1] now (ms)
  Returns 0 = delivered now, 1 = already delivered, -7 = order unknown to Redis,
          -11 = order not in a deliverable state (see core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, order_key = KEYS[1], KEYS[2]
local order = rcall("HMGET", order_key, "status", "qty")
if not order[1] then
  return -7
elseif order[1] == "delivered" then
  return 1
elseif order[1] ~= "confirmed" then
  return -11
end
local qty = tonumber(order[2])
rcall("HSET", order_key, "status", "delivered", "delivered_at", ARGV[1])
rcall("HINCRBY", sale_key, "confirmed", -qty)
rcall("HINCRBY", sale_key, "delivered", qty)
return 0
