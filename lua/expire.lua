--[[
  Expire the reservations of one sale whose deadline has passed: one call for a whole batch.
  Safe to run from many sweepers at once: only the first call that finds an order "reserved"
  gives its stock back.

  KEYS[1] sale hash   KEYS[2] deadlines zset   KEYS[3] events stream   KEYS[4] buyers hash
  KEYS[5..n] order hashes (of that sale)
  ARGV[1] now (ms)    ARGV[2..] the orders' ids, in KEYS order
  Returns one code per order: 0 = expired now, 1 = nothing to do (already settled, or not
  yet due)   (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, deadlines_key, events_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])

--!include release

local out = {}
for i = 5, #KEYS do
  local order_key, order_id = KEYS[i], ARGV[i - 3]
  local order = rcall("HMGET", order_key, "status", "exp")
  if order[1] ~= "reserved" then
    rcall("ZREM", deadlines_key, order_id)
    out[#out + 1] = 1
  elseif now < tonumber(order[2]) then
    out[#out + 1] = 1
  else
    release_reservation(sale_key, order_key, deadlines_key, events_key, buyers_key,
                        order_id, "expired", now)
    out[#out + 1] = 0
  end
end
return out
