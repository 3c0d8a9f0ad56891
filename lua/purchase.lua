--[[
  A purchase scored by the risk engine and, if allowed, reserved: one script, one round trip.
  reserve.lua plus, between the idempotency check and the reservation: admission limits,
  risk features, the score of the feature rules and the verdict.

  Order: no sale -> -4; an answered Idempotency-Key -> its answer (never refused by risk);
  the sale window -> -3 (before anything is counted: no challenge is ever issued for a sale
  that is not open, so none can be banked before the opening); admission -> -12; features
  recorded; score = base + weights of fired rules; score >= deny -> -13; score >= challenge ->
  -14 unless a genuine solution is presented and unused (then it is marked used and the
  purchase goes on); then the reservation.
  A refusal is remembered under its Idempotency-Key with the request's fingerprint: a repeat
  of that key with the same body (a double click, a retry) gets the same verdict without being
  counted again, except that a challenged key retried with a genuine, unused solution passes
  admission like any request and goes on to the reservation; a repeat with another body is
  -5 (the key was used for another request). Users are namespaced by channel: the user's
  counter key (KEYS[9]) is built for <channel>:<user id>, and the buyers hash and the
  distinct-user sketches count <channel>:<user id> (buyer_field).
  Verdicts hash values: "<code>|<score>|<fired>|<shadow>|<fingerprint>".

  KEYS[1] sale hash        KEYS[2] buyers hash      KEYS[3] idempotency hash
  KEYS[4] deadlines zset   KEYS[5] events stream    KEYS[6] the new order's hash
  KEYS[7] admission TAT of the sale                 KEYS[8] admission TAT of the channel
  KEYS[9..12] counter hashes: user, device, ip, subnet
  KEYS[13] HLL users of the device                  KEYS[14] HLL users of the ip
  KEYS[15] used-solution marker                     KEYS[16] verdicts hash (Idempotency-Key)
  ARGV[1..8] as reserve.lua: now (ms), order id, idempotency field, fingerprint, channel id,
             user id, quantity, payment ref
  ARGV[9] sale rate (req/s, 0 = unlimited)   ARGV[10] sale burst
  ARGV[11] channel rate                      ARGV[12] channel burst
  ARGV[13] solution marker ttl (ms; 0 = no genuine solution presented)
  ARGV[14] base score (rules decided without Redis: datacenter ip, invalid ip, no user agent)
  ARGV[15] challenge threshold               ARGV[16] deny threshold
  ARGV[17] feature rules, "<feature index>:<limit>:<weight>:<mode>" joined by ";"
           (feature index 1-based into the features of includes/risk_measure.lua;
            mode 1 = on, 2 = shadow)
  ARGV[18] the caller's stock bucket count (as reserve.lua's ARGV[9]; risk keys are then the
           home bucket's too)
  Returns {code, order_id, status, expires_at_ms | retry_after_ms, score, fired, shadow, solution}
    fired, shadow: the positions (1-based) in ARGV[17] of the rules that fired, "," joined
    solution: 0 = none used, 1 = a fresh solution was used, 2 = the solution was already used
    code  as reserve.lua (0, 1, -1, -2, -6, -15 and -17 after risk allowed it; -3, -4, -5
         and -16 before anything is counted), and
         -12 = rate limited (3rd value: the limit, "sale_rate" or "channel_rate"; 4th: retry
               after, ms; nothing recorded)
         -13 = denied by risk   -14 = challenge required (features recorded, nothing reserved)
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call

--!include reserve_order
--!include risk_measure

local sale_key, buyers_key, idem_key = KEYS[1], KEYS[2], KEYS[3]
local now, idem_field, fingerprint = tonumber(ARGV[1]), ARGV[3], ARGV[4]
local user = ARGV[6]

local sale = rcall("HMGET", sale_key, unpack(SALE_FIELDS))
if not sale[1] then
  return {-4, "", "", 0, 0, "", "", 0}
end
local misrouted = wrong_buckets(sale, ARGV[18])
if misrouted then
  misrouted[5], misrouted[6], misrouted[7], misrouted[8] = 0, "", "", 0
  return misrouted
end
local replay = idempotent_replay(idem_key, idem_field, fingerprint)
if replay then
  replay[5], replay[6], replay[7], replay[8] = 0, "", "", 0
  return replay
end
local closed = closed_window(sale, now)
if closed then
  closed[5], closed[6], closed[7], closed[8] = 0, "", "", 0
  return closed
end

local keep_until = math.max(tonumber(sale[2]), now) + 3600000  -- risk state outlives the sale
local verdicts_key = KEYS[16]

local function refuse(code, score, fired_s, shadow_s, solution)
  rcall("HSET", verdicts_key, idem_field,
        code .. "|" .. score .. "|" .. fired_s .. "|" .. shadow_s .. "|" .. fingerprint)
  rcall("PEXPIREAT", verdicts_key, keep_until)
  return {code, "", "", 0, score, fired_s, shadow_s, solution}
end

-- Past the risk checks: spend the solution if the score asked for one, then reserve.
local function go_on(score, fired_s, shadow_s, challenged)
  local solution = 0
  if challenged then
    local ttl = tonumber(ARGV[13])
    if ttl == 0 then
      return refuse(-14, score, fired_s, shadow_s, 0)
    end
    if not rcall("SET", KEYS[15], "1", "NX", "PX", ttl) then
      return refuse(-14, score, fired_s, shadow_s, 2)
    end
    solution = 1
  end
  local out = reserve_order(sale_key, buyers_key, idem_key, KEYS[4], KEYS[5], KEYS[6], sale,
                            now, ARGV[2], idem_field, fingerprint, ARGV[5], user,
                            tonumber(ARGV[7]), ARGV[8])
  out[5], out[6], out[7], out[8] = score, fired_s, shadow_s, solution
  return out
end

local function admitted()
  return admit(KEYS[7], KEYS[8], now, tonumber(ARGV[9]), tonumber(ARGV[10]),
               tonumber(ARGV[11]), tonumber(ARGV[12]))
end

-- A verdict is honoured only for the request it was given to (its fingerprint): a challenge
-- answered for one body never lets another body through under the same key.
-- (A verdict stored before fingerprints were, "code|score|fired|shadow", is not honoured: the
-- key is scored afresh.)
local verdict = rcall("HGET", verdicts_key, idem_field)
local code, score, fired_s, shadow_s, fp
if verdict then
  code, score, fired_s, shadow_s, fp =
    string.match(verdict, "^(-?%d+)|(%d+)|([^|]*)|([^|]*)|([^|]*)$")
end
if code then
  if fp ~= fingerprint then
    return {-5, "", "", 0, 0, "", "", 0}
  end
  if code == "-14" then
    -- A retry with a genuine solution is a request like any other that may reach the
    -- reservation: admitted (or not) now, never banked. Without one it is refused again as is.
    if tonumber(ARGV[13]) > 0 then
      local wait, limit = admitted()
      if wait > 0 then
        return {-12, "", limit, wait, 0, "", "", 0}
      end
    end
    return go_on(tonumber(score), fired_s, shadow_s, true)
  end
  return {tonumber(code), "", "", 0, tonumber(score), fired_s, shadow_s, 0}
end

local wait, limit = admitted()
if wait > 0 then
  return {-12, "", limit, wait, 0, "", "", 0}
end
-- Users are namespaced by channel (buyer_field): the user's counter key is built so by the
-- caller; the distinct-user sketches of a device or ip count <channel>:<user>.
local features = measure(now, buyer_field(ARGV[5], user), KEYS[9], KEYS[10], KEYS[11],
                         KEYS[12], KEYS[13], KEYS[14], buyers_key, keep_until)

local fired, shadow, position = {}, {}, 0
score = tonumber(ARGV[14])
for index, limit, weight, mode in string.gmatch(ARGV[17], "(%d+):(%d+):(%d+):(%d+)") do
  position = position + 1
  if features[tonumber(index)] > tonumber(limit) then
    if mode == "2" then
      shadow[#shadow + 1] = position
    else
      fired[#fired + 1] = position
      score = score + tonumber(weight)
    end
  end
end
score = math.min(score, 100)
fired_s, shadow_s = table.concat(fired, ","), table.concat(shadow, ",")

if score >= tonumber(ARGV[16]) then
  return refuse(-13, score, fired_s, shadow_s, 0)
end
return go_on(score, fired_s, shadow_s, score >= tonumber(ARGV[15]))
