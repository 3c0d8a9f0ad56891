--[[
  After a Redis failover: bring into one ledger shard the orders PostgreSQL holds that Redis
  lacks, or holds at a status PostgreSQL can't legitimately be ahead of (core/failover.py).
  PostgreSQL only learns orders from Redis' events, so such an order is a write the promoted
  replica never received: it is put back as PostgreSQL has it, with its units, its buyer's
  count and its stock counters; a confirmed order is announced again on the stream, so that
  the workers deliver it. Idempotent: an order already consistent is left alone, so a merge
  run twice (or racing another) changes nothing the second time.

  Per order, Redis' counters lose what its old status held and gain what the new one holds:
    reserved   available -q, reserved +q, buyer +q, its deadline
    confirmed  available -q, confirmed +q, buyer +q (and a "confirmed" stream event)
    delivered  available -q, delivered +q, buyer +q
    cancelled / expired   that counter +q
    refunded   refunded +q; outcome "voided": voided +q, available -q as well
  `available` may go below 0: units the new primary sold again before the pause (reported as
  oversold by reconcile; never hidden).

  KEYS[1] sale hash   KEYS[2] buyers hash   KEYS[3] deadlines zset   KEYS[4] events stream
  KEYS[5..n] order hashes, in the order of ARGV[1]
  ARGV[1] JSON: [[id, channel, user, qty, status, created, exp, pay, confirmed_at, refund
          outcome], ...] (PostgreSQL's view; every value a string)
  ARGV[2] the statuses each PostgreSQL status is consistent with, JSON
          {pg status: [redis status, ...]}
  ARGV[3] now (ms)
  Returns {code, orders merged, units the ledger took}
    code  0 = merged (possibly none)   -4 = no sale hash: nothing done (a lost ledger is
          rebuilt by `flashgate reconcile`, lua/restore_sale.lua)
  (mirrored by core.scripts.ReturnCode: OK, NO_SALE)
]]
local rcall = redis.call
local sale_key, buyers_key, deadlines_key, events_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if rcall("EXISTS", sale_key) == 0 then
  return {-4, 0, 0}
end
local orders = cjson.decode(ARGV[1])
local consistent = cjson.decode(ARGV[2])
local now = ARGV[3]

-- What a status holds in the ledger: {counter deltas}, units held by the buyer.
local function holds(status, qty, outcome)
  if status == "reserved" or status == "confirmed" or status == "delivered" then
    return {available = -qty, [status] = qty}, qty
  elseif status == "cancelled" or status == "expired" then
    return {[status] = qty}, 0
  elseif status == "refunded" then
    if outcome == "voided" then
      return {refunded = qty, voided = qty, available = -qty}, 0
    end
    return {refunded = qty}, 0
  end
  return {}, 0
end

local merged, units = 0, 0
for i, o in ipairs(orders) do
  local id, channel, user, qty, status = o[1], o[2], o[3], tonumber(o[4]), o[5]
  local order_key = KEYS[4 + i]
  local have = rcall("HMGET", order_key, "status", "rfo")
  local ok = false
  for _, s in ipairs(consistent[status] or {}) do
    if s == have[1] then
      ok = true
    end
  end
  if not ok then
    local delta, buyer_delta = {}, 0
    local gain, gained = holds(status, qty, o[10])
    local loss, lost = {}, 0
    if have[1] then
      loss, lost = holds(have[1], qty, have[2])
    end
    for f, v in pairs(gain) do delta[f] = (delta[f] or 0) + v end
    for f, v in pairs(loss) do delta[f] = (delta[f] or 0) - v end
    buyer_delta = gained - lost
    for f, v in pairs(delta) do
      if v ~= 0 then
        rcall("HINCRBY", sale_key, f, v)
      end
    end
    if (delta["available"] or 0) > 0 then
      rcall("HINCRBY", sale_key, "restocks", 1)
      rcall("HDEL", sale_key, "drained_until")
    end
    local buyer = channel .. ":" .. user  -- buyer_field of includes/reserve_order.lua
    if buyer_delta ~= 0 and tonumber(rcall("HINCRBY", buyers_key, buyer, buyer_delta)) <= 0 then
      rcall("HDEL", buyers_key, buyer)
    end
    rcall("HSET", order_key, "ch", channel, "user", user, "qty", qty, "status", status,
          "created", o[6], "exp", o[7], "pay", o[8], "merged", now)
    if o[10] ~= "" then
      rcall("HSET", order_key, "rfo", o[10])
    end
    if status == "reserved" then
      rcall("ZADD", deadlines_key, o[7], id)
    else
      rcall("ZREM", deadlines_key, id)
    end
    if status == "confirmed" then
      rcall("XADD", events_key, "*", "t", "confirmed", "o", id, "ch", channel, "u", user,
            "q", qty, "at", o[9], "exp", o[7], "pay", o[8])
    end
    merged = merged + 1
    units = units + gained - lost
  end
end
return {0, merged, units}
