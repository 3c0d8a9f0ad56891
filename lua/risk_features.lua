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
  reservation script replays its answer, so risk never contradicts an earlier 201. A repeat of
  a key risk has already seen (a concurrent double click, or a retry after a refusal) gets the
  features recorded for its first sight, neither admitted nor counted again: the same key always
  gets the same score, so duplicates can't split into a 201 and a refusal, and retrying a
  refused key changes nothing.
  Keys of unknown sales are never created.

  KEYS[1] sale hash                 KEYS[2] admission TAT of the sale
  KEYS[3] admission TAT of the channel in the sale
  KEYS[4] counter hash user   KEYS[5] device   KEYS[6] ip   KEYS[7] subnet
  KEYS[8] HLL users of the device    KEYS[9] HLL users of the ip
  KEYS[10] buyers hash               KEYS[11] used-solution marker
  KEYS[12] idempotency hash          KEYS[13] features memo by idempotency key (hash)
  ARGV[1] now (ms)   ARGV[2] user id
  ARGV[3] sale rate (req/s, 0 = unlimited)      ARGV[4] sale burst
  ARGV[5] channel rate (req/s, 0 = unlimited)   ARGV[6] channel burst
  ARGV[7] solution marker ttl (ms; 0 = no solution presented)
  ARGV[8] idempotency field (<channel>:<Idempotency-Key>; "" = none)
  Returns {code, retry_after_ms, user_1s, user_60s, device_1s, device_60s, ip_1s, ip_60s,
           subnet_1s, subnet_60s, device_users, ip_users, user_held, solution_fresh}
    code  0 = admitted, features follow   -4 = no such sale (nothing recorded)
          1 = a replay of an answered Idempotency-Key (nothing recorded)
         -12 = rate limited (retry_after_ms > 0, nothing recorded)
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, sale_adm_key, channel_adm_key = KEYS[1], KEYS[2], KEYS[3]
local buyers_key, solution_key = KEYS[10], KEYS[11]
local now, user = tonumber(ARGV[1]), ARGV[2]
local solution_ttl = tonumber(ARGV[7])

local sale_end = rcall("HGET", sale_key, "end")
if not sale_end then
  return {-4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
end
local idem_field, memo_key = ARGV[8], KEYS[13]
if idem_field ~= "" and rcall("HEXISTS", KEYS[12], idem_field) == 1 then
  return {1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
end
local keep_until = math.max(tonumber(sale_end), now) + 3600000  -- risk state outlives the sale

local function use_solution()
  if solution_ttl > 0 and rcall("SET", solution_key, "1", "NX", "PX", solution_ttl) then
    return 1
  end
  return 0
end

local memo = idem_field ~= "" and rcall("HGET", memo_key, idem_field)
if memo then
  local out = {0, 0}
  for value in string.gmatch(memo, "[^,]+") do
    out[#out + 1] = tonumber(value)
  end
  out[#out + 1] = use_solution()
  return out
end

-- GCRA in microseconds (integers, exact in a double): a request is admitted when the
-- theoretical arrival time, pushed one emission interval on, is within burst intervals of now.
local now_us = now * 1000
local function gcra(key, rate, burst)
  if rate <= 0 then
    return 0, nil
  end
  local interval = math.floor(1000000 / rate)
  local tat = tonumber(rcall("GET", key) or now_us)
  if tat < now_us then
    tat = now_us
  end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if now_us < allow_at then
    return math.ceil((allow_at - now_us) / 1000), nil
  end
  return 0, new_tat
end
local wait_sale, tat_sale = gcra(sale_adm_key, tonumber(ARGV[3]), tonumber(ARGV[4]))
local wait_channel, tat_channel = gcra(channel_adm_key, tonumber(ARGV[5]), tonumber(ARGV[6]))
if wait_sale > 0 or wait_channel > 0 then
  return {-12, math.max(wait_sale, wait_channel), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
end
if tat_sale then
  rcall("SET", sale_adm_key, string.format("%.0f", tat_sale), "PX",
        math.ceil((tat_sale - now_us) / 1000) + 1)
end
if tat_channel then
  rcall("SET", channel_adm_key, string.format("%.0f", tat_channel), "PX",
        math.ceil((tat_channel - now_us) / 1000) + 1)
end

-- Sliding windows: fields <w>i (bucket index), <w>c (its count), <w>p (previous bucket's).
local WINDOWS = {{"s", 1000}, {"m", 60000}}
local function hit(key)
  local v = rcall("HMGET", key, "si", "sc", "sp", "mi", "mc", "mp")
  local out, update = {}, {}
  for w, spec in ipairs(WINDOWS) do
    local name, size = spec[1], spec[2]
    local bucket = math.floor(now / size)
    local idx, cur, prev = tonumber(v[w * 3 - 2]), tonumber(v[w * 3 - 1] or 0), tonumber(v[w * 3] or 0)
    if idx ~= bucket then
      prev = (idx == bucket - 1) and cur or 0
      cur = 0
    end
    cur = cur + 1
    local weight = 1 - (now - bucket * size) / size
    out[w] = math.floor(cur + prev * weight)
    for _, x in ipairs({name .. "i", bucket, name .. "c", cur, name .. "p", prev}) do
      update[#update + 1] = x
    end
  end
  rcall("HSET", key, unpack(update))
  rcall("PEXPIRE", key, 2 * 60000)
  return out[1], out[2]
end
local u1, u60 = hit(KEYS[4])
local d1, d60 = hit(KEYS[5])
local i1, i60 = hit(KEYS[6])
local s1, s60 = hit(KEYS[7])

-- Distinct users during the sale.
local function distinct(key)
  rcall("PFADD", key, user)
  rcall("PEXPIREAT", key, keep_until)
  return rcall("PFCOUNT", key)
end
local device_users = distinct(KEYS[8])
local ip_users = distinct(KEYS[9])

local held = tonumber(rcall("HGET", buyers_key, user) or "0")
local features = {u1, u60, d1, d60, i1, i60, s1, s60, device_users, ip_users, held}
if idem_field ~= "" then
  rcall("HSET", memo_key, idem_field, table.concat(features, ","))
  rcall("PEXPIREAT", memo_key, keep_until)
end
local out = {0, 0}
for _, value in ipairs(features) do
  out[#out + 1] = value
end
out[#out + 1] = use_solution()
return out
