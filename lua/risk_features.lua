--[[
  Admit one purchase attempt and read its risk features, in one round trip.

  1. Admission (GCRA) for the whole sale and for the channel in the sale: if either refuses,
     nothing is recorded and the caller answers 429 with the returned wait.
  2. Sliding-window request counts (1 s and 60 s) for the user, device, ip and subnet: each
     counter keeps its current and previous fixed bucket, and the estimate weights the previous
     bucket by the part of it still inside the window (O(1) memory per counter).
  3. Distinct users per device and per ip during the sale: HyperLogLog (PFADD/PFCOUNT), so a
     shared ip with thousands of users stays a few KB; below a few hundred users the sparse
     encoding is practically exact, which is where the thresholds sit.
  4. Units the user already holds in the sale (the ledger's buyers hash).
  5. Optionally marks a challenge solution as used (SET NX), so a solution is single-use.
  A retry of an Idempotency-Key the ledger already answered passes untouched (code 1): the
  reservation script replays its answer, so risk never contradicts an earlier 201. Outside
  the sale's window nothing is admitted, counted or scored (code -3: the reservation script
  answers "not active"), so no challenge can be collected before the opening. A repeat of a
  key risk has already seen (a concurrent double click, or a retry after a refusal) with the
  same request fingerprint gets the features recorded for its first sight, not counted again
  but admitted again like any request that may reach the reservation (a solved challenge is
  no head start); with another fingerprint it is -5 (the key belongs to another request).
  Keys of unknown sales are never created.

  KEYS[1] sale hash                 KEYS[2] admission TAT of the sale
  KEYS[3] admission TAT of the channel in the sale
  KEYS[4] counter hash user   KEYS[5] device   KEYS[6] ip   KEYS[7] subnet
  KEYS[8] HLL users of the device    KEYS[9] HLL users of the ip
  KEYS[10] buyers hash               KEYS[11] used-solution marker
  KEYS[12] idempotency hash          KEYS[13] features memo by idempotency key (hash)
  ARGV[1] now (ms)   ARGV[2] the user as the buyers hash knows it (<channel>:<user id>)
  ARGV[3] sale rate (req/s, 0 = unlimited)      ARGV[4] sale burst
  ARGV[5] channel rate (req/s, 0 = unlimited)   ARGV[6] channel burst
  ARGV[7] solution marker ttl (ms; 0 = no solution presented)
  ARGV[8] idempotency field (<channel>:<Idempotency-Key>; "" = none)
  ARGV[9] request fingerprint (as reserve.lua's ARGV[4])
  Returns {code, retry_after_ms, user_1s, user_60s, device_1s, device_60s, ip_1s, ip_60s,
           subnet_1s, subnet_60s, device_users, ip_users, user_held, solution_fresh}
    code  0 = admitted, features follow   -4 = no such sale (nothing recorded)
          1 = a replay of an answered Idempotency-Key (nothing recorded)
         -3 = the sale is not open now (nothing recorded)
         -5 = the Idempotency-Key was first seen with another request (nothing recorded)
         -12 = rate limited: {-12, retry_after_ms > 0, "sale_rate" | "channel_rate"} (the
               limit that answered; nothing recorded)
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call

--!include risk_measure

local sale_key, sale_adm_key, channel_adm_key = KEYS[1], KEYS[2], KEYS[3]
local buyers_key, solution_key = KEYS[10], KEYS[11]
local now, user = tonumber(ARGV[1]), ARGV[2]
local solution_ttl = tonumber(ARGV[7])
local NOTHING = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

local sale = rcall("HMGET", sale_key, "start", "end", "state")
if not sale[1] then
  return {-4, 0, unpack(NOTHING)}
end
local idem_field, memo_key, fingerprint = ARGV[8], KEYS[13], ARGV[9]
if idem_field ~= "" and rcall("HEXISTS", KEYS[12], idem_field) == 1 then
  return {1, 0, unpack(NOTHING)}
end
if now < tonumber(sale[1]) or now >= tonumber(sale[2]) or sale[3] ~= "open" then
  return {-3, 0, unpack(NOTHING)}
end
local keep_until = math.max(tonumber(sale[2]), now) + 3600000  -- risk state outlives the sale

local function use_solution()
  if solution_ttl > 0 and rcall("SET", solution_key, "1", "NX", "PX", solution_ttl) then
    return 1
  end
  return 0
end

-- The memo is "<fingerprint>|<features, comma-joined>" (one without a fingerprint, stored by
-- an older version, is not honoured: the key is measured afresh).
local memo = idem_field ~= "" and rcall("HGET", memo_key, idem_field)
local memo_fp, memo_features
if memo then
  memo_fp, memo_features = string.match(memo, "^([^|]*)|(.*)$")
  if memo_fp and memo_fp ~= fingerprint then
    return {-5, 0, unpack(NOTHING)}
  end
end

local wait, limit = admit(sale_adm_key, channel_adm_key, now, tonumber(ARGV[3]),
                          tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
if wait > 0 then
  return {-12, wait, limit}
end
if memo_features then
  local out = {0, 0}
  for value in string.gmatch(memo_features, "[^,]+") do
    out[#out + 1] = tonumber(value)
  end
  out[#out + 1] = use_solution()
  return out
end

local features = measure(now, user, KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9],
                         buyers_key, keep_until)
if idem_field ~= "" then
  rcall("HSET", memo_key, idem_field, fingerprint .. "|" .. table.concat(features, ","))
  rcall("PEXPIREAT", memo_key, keep_until)
end
local out = {0, 0}
for _, value in ipairs(features) do
  out[#out + 1] = value
end
out[#out + 1] = use_solution()
return out
