-- Shared by risk_features.lua and purchase.lua: admission limits and the risk features.

-- GCRA in microseconds (integers, exact in a double): a request is admitted when the
-- theoretical arrival time, pushed one emission interval on, is within burst intervals of now.
-- Returns the wait in ms (0 = admitted) and the new TAT to store.
-- A stored TAT beyond now + burst intervals (a full bucket) can't come from the current config:
-- it was left by an earlier, slower one (an admin override since reverted, a smaller burst).
-- It is clamped to a full bucket less one interval, so the new config takes effect at once
-- (this request is admitted and stores a full bucket; the next ones wait at most one interval
-- of the current config) and a Retry-After never exceeds what the current config allows.
-- (risk/config.py bounds rates and bursts, so the values stay exact integers in a double.)
local function gcra(key, now, rate, burst)
  if rate <= 0 then
    return 0, nil
  end
  local now_us = now * 1000
  local interval = math.floor(1000000 / rate)
  local tat = tonumber(rcall("GET", key) or now_us)
  if tat < now_us then
    tat = now_us
  end
  if tat > now_us + burst * interval then
    tat = now_us + (burst - 1) * interval
  end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if now_us < allow_at then
    return math.ceil((allow_at - now_us) / 1000), nil
  end
  return 0, new_tat
end

-- Both admission limits (sale, channel in the sale); nothing is recorded unless both admit.
-- Returns the wait in ms (0 when admitted) and the limit that answered: "sale_rate" or
-- "channel_rate" (risk/config.py's names; when both refuse, the one with the longer wait,
-- which sets Retry-After), "" when admitted.
local function admit(sale_adm_key, channel_adm_key, now, sale_rate, sale_burst,
                     channel_rate, channel_burst)
  local wait_sale, tat_sale = gcra(sale_adm_key, now, sale_rate, sale_burst)
  local wait_channel, tat_channel = gcra(channel_adm_key, now, channel_rate, channel_burst)
  if wait_sale > 0 or wait_channel > 0 then
    if wait_sale >= wait_channel then
      return wait_sale, "sale_rate"
    end
    return wait_channel, "channel_rate"
  end
  for key, tat in pairs({[sale_adm_key] = tat_sale, [channel_adm_key] = tat_channel}) do
    if tat then
      rcall("SET", key, string.format("%.0f", tat), "PX", math.ceil(tat / 1000 - now) + 1)
    end
  end
  return 0, ""
end

-- One fixed-bucket pair of a sliding window after a hit in bucket b (frac: how far into b):
-- returns idx, count, prev and the estimate, which weights the previous bucket by the part of
-- it still inside the window. Concurrent requests reach Redis slightly out of their `now`
-- order, so a hit from the bucket before the stored one is a late arrival: it is counted in
-- that bucket and never rolls the window back (rolling back would wipe the newer counts and
-- let a burst through at every boundary); its estimate is both buckets, whole.
local function slide(idx, count, prev, b, frac)
  if b == idx then
    count = count + 1
  elseif b > idx then
    prev = (idx == b - 1) and count or 0
    idx, count = b, 1
  else
    if b == idx - 1 then prev = prev + 1 end  -- older still: outside every window kept
    return idx, count, prev, count + prev
  end
  return idx, count, prev, math.floor(count + prev * (1 - frac))
end

-- Sliding windows (1 s and 60 s): each counter is one string "<s idx>,<s count>,<s prev>,
-- <m idx>,<m count>,<m prev>": the current and previous fixed bucket of each window.
local function hit(key, now)
  local si, sc, sp, mi, mc, mp = 0, 0, 0, 0, 0, 0
  local raw = rcall("GET", key)
  if raw then
    si, sc, sp, mi, mc, mp = string.match(raw, "^(%d+),(%d+),(%d+),(%d+),(%d+),(%d+)$")
    si, sc, sp, mi, mc, mp = tonumber(si), tonumber(sc), tonumber(sp), tonumber(mi),
                             tonumber(mc), tonumber(mp)
  end
  local s_bucket, m_bucket = math.floor(now / 1000), math.floor(now / 60000)
  local s_est, m_est
  si, sc, sp, s_est = slide(si, sc, sp, s_bucket, (now - s_bucket * 1000) / 1000)
  mi, mc, mp, m_est = slide(mi, mc, mp, m_bucket, (now - m_bucket * 60000) / 60000)
  rcall("SET", key, si .. "," .. sc .. "," .. sp .. "," .. mi .. "," .. mc .. "," .. mp,
        "PX", 120000)
  return s_est, m_est
end

-- Distinct users during the sale: HyperLogLog, so a shared ip with thousands of users stays a
-- few KB; below a few hundred users its sparse encoding is practically exact.
local function distinct(key, user, keep_until)
  if rcall("PFADD", key, user) == 1 then
    rcall("PEXPIREAT", key, keep_until)
  end
  return rcall("PFCOUNT", key)
end

-- `user` is the user as the ledger's buyers hash knows it: <channel>:<user id>.
-- The features of one request (this request included), in the order of risk.rules.Features:
-- {user_1s, user_60s, device_1s, device_60s, ip_1s, ip_60s, subnet_1s, subnet_60s,
--  device_users, ip_users, user_held}
local function measure(now, user, user_key, device_key, ip_key, subnet_key,
                       device_users_key, ip_users_key, buyers_key, keep_until)
  local u1, u60 = hit(user_key, now)
  local d1, d60 = hit(device_key, now)
  local i1, i60 = hit(ip_key, now)
  local s1, s60 = hit(subnet_key, now)
  return {u1, u60, d1, d60, i1, i60, s1, s60,
          distinct(device_users_key, user, keep_until), distinct(ip_users_key, user, keep_until),
          tonumber(rcall("HGET", buyers_key, user) or "0")}
end
