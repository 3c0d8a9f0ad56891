--[[
  Decide one purchase atomically: sale window, idempotency, per-user limit, stock,
  reservation with its deadline, and the order event on the sale's stream.

  KEYS[1] sale hash        KEYS[2] buyers hash      KEYS[3] idempotency hash
  KEYS[4] deadlines zset   KEYS[5] events stream    KEYS[6] the new order's hash
  ARGV[1] now (ms)         ARGV[2] order id         ARGV[3] idempotency field (<channel>:<key>)
  ARGV[4] request fingerprint                       ARGV[5] channel id
  ARGV[6] user id          ARGV[7] quantity         ARGV[8] payment ref ("" = reserve only)
  Returns {code, order_id, status, expires_at_ms}
    code  0 = new order (status "reserved", or "confirmed" with a payment ref)
          1 = idempotent replay: the original order's answer
         -1 = sold out   -2 = per-user limit   -3 = sale not active (window or paused)
         -4 = no such sale   -5 = idempotency key reused with another request
         -6 = fewer units left than asked for
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, buyers_key, idem_key = KEYS[1], KEYS[2], KEYS[3]
local deadlines_key, events_key, order_key = KEYS[4], KEYS[5], KEYS[6]
local now, order_id, idem_field, fingerprint = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local channel, user, qty, payment_ref = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]

-- An earlier answer to the same idempotency key wins over everything, even a closed window.
local previous = rcall("HGET", idem_key, idem_field)
if previous then
  local fp, prev_order, prev_status, prev_exp = string.match(previous, "^([^|]*)|([^|]*)|([^|]*)|([^|]*)$")
  if fp ~= fingerprint then
    return {-5, prev_order, "", 0}
  end
  return {1, prev_order, prev_status, tonumber(prev_exp)}
end

local sale = rcall("HMGET", sale_key, "start", "end", "limit", "ttl", "available", "state")
if not sale[1] then
  return {-4, "", "", 0}
end
if now < tonumber(sale[1]) or now >= tonumber(sale[2]) or sale[6] ~= "open" then
  return {-3, "", "", 0}
end
local held = tonumber(rcall("HGET", buyers_key, user) or "0")
if held + qty > tonumber(sale[3]) then
  return {-2, "", "", 0}
end
local available = tonumber(sale[5])
if available <= 0 then
  return {-1, "", "", 0}
end
if available < qty then
  return {-6, "", "", 0}
end

local status, expires_at = "reserved", now + tonumber(sale[4])
rcall("HINCRBY", sale_key, "available", -qty)
rcall("HINCRBY", buyers_key, user, qty)
if payment_ref == "" then
  rcall("HINCRBY", sale_key, "reserved", qty)
  rcall("ZADD", deadlines_key, expires_at, order_id)
else
  status = "confirmed"
  rcall("HINCRBY", sale_key, "confirmed", qty)
end
rcall("HSET", order_key, "ch", channel, "user", user, "qty", qty, "status", status,
      "created", now, "exp", expires_at, "pay", payment_ref, "fp", fingerprint)
rcall("HSET", idem_key, idem_field,
      fingerprint .. "|" .. order_id .. "|" .. status .. "|" .. expires_at)
rcall("XADD", events_key, "*", "t", status, "o", order_id, "ch", channel, "u", user,
      "q", qty, "at", now, "exp", expires_at, "pay", payment_ref)
return {0, order_id, status, expires_at}
