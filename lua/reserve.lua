--[[
  Decide one purchase atomically: sale window, idempotency, per-user limit, stock,
  reservation with its deadline, and the order event on the sale's stream.
  (The risk engine's variant, scoring the request in the same call, is purchase.lua.)

  KEYS[1] sale hash        KEYS[2] buyers hash      KEYS[3] idempotency hash
  KEYS[4] deadlines zset   KEYS[5] events stream    KEYS[6] the new order's hash
  ARGV[1] now (ms)         ARGV[2] order id         ARGV[3] idempotency field (<channel>:<key>)
  ARGV[4] request fingerprint                       ARGV[5] channel id
  ARGV[6] user id (the channel's own: the buyers hash keys it as <channel>:<user id>)
  ARGV[7] quantity         ARGV[8] payment ref ("" = reserve only)
  ARGV[9] the caller's stock bucket count of the sale (absent = 1; the keys are the user's
          home bucket's, core.ids.home_bucket)
  Returns {code, order_id, status, expires_at_ms}
    code  0 = new order (status "reserved", or "confirmed" with a payment ref)
          1 = idempotent replay: the original order's answer
         -1 = sold out   -2 = per-user limit
         -3 = sale not active (window or paused): 2nd value its start, 3rd its end (ms)
         -4 = no such sale   -5 = idempotency key reused with another request
         -6 = fewer units left than asked for
         -17 = the quantity is not a whole number >= 1 (nothing done)
         -15 = (sale of several buckets) this bucket is short: 4th value its available units
         -16 = the sale has another bucket count: 4th value that count (nothing done)
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call

--!include reserve_order

local sale = rcall("HMGET", KEYS[1], unpack(SALE_FIELDS))
local misrouted = wrong_buckets(sale, ARGV[9])
if misrouted then
  return misrouted
end
-- An earlier answer to the same idempotency key wins over everything, even a closed window.
local replay = idempotent_replay(KEYS[3], ARGV[3], ARGV[4])
if replay then
  return replay
end
if not sale[1] then
  return {-4, "", "", 0}
end
return reserve_order(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], sale,
                     tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
                     tonumber(ARGV[7]), ARGV[8])
