-- Shared by reserve.lua and purchase.lua: the idempotent replay and the reservation itself.

-- The earlier answer to an Idempotency-Key, or nil: {1, order, status, exp} for the same
-- request, {-5, order, "", 0} for another request under the same key.
local function idempotent_replay(idem_key, idem_field, fingerprint)
  local previous = rcall("HGET", idem_key, idem_field)
  if not previous then
    return nil
  end
  local fp, order, status, exp = string.match(previous, "^([^|]*)|([^|]*)|([^|]*)|([^|]*)$")
  if fp ~= fingerprint then
    return {-5, order, "", 0}
  end
  return {1, order, status, tonumber(exp)}
end

-- The fields of the sale hash reserve_order reads (HMGET sale_key unpack(SALE_FIELDS)).
local SALE_FIELDS = {"start", "end", "limit", "ttl", "available", "state", "buckets",
                     "drained_until"}

-- The refusal of a caller that routed by another bucket count than the sale's (nil if it
-- agrees): checked before anything else, so that the caller routes again with nothing done.
local function wrong_buckets(sale, caller_buckets)
  local buckets = tonumber(sale[7] or "1")
  if sale[1] and buckets ~= (tonumber(caller_buckets) or 1) then
    return {-16, "", "", buckets}
  end
  return nil
end

-- The refusal of a purchase outside the sale's window (nil while it is open):
-- {-3, start ms, end ms, 0}, so that the caller can say when it opens or when it ended.
local function closed_window(sale, now)
  if now < tonumber(sale[1]) or now >= tonumber(sale[2]) or sale[6] ~= "open" then
    return {-3, sale[1], sale[2], 0}
  end
  return nil
end

-- The buyers hash's field of a user: user ids are namespaced by channel, since each storefront
-- has a user id space of its own (channel B's "u-1" is not channel A's).
local function buyer_field(channel, user)
  return channel .. ":" .. user
end

-- Quantity, window, per-user limit, stock, then the reservation (or confirmation, with a payment ref),
-- its deadline, the idempotency answer and the stream event.
-- `sale` is HMGET sale_key unpack(SALE_FIELDS). In a sale of several stock buckets, a bucket
-- short of stock answers -15 (4th value: its available units) unless the whole sale was found
-- empty moments ago (`drained_until`, lua/mark_drained.lua): the caller then moves stock in
-- from another bucket, or finds the sale sold out (core/buckets.py).
local function reserve_order(sale_key, buyers_key, idem_key, deadlines_key, events_key,
                             order_key, sale, now, order_id, idem_field, fingerprint, channel,
                             user, qty, payment_ref)
  -- The gateway sends 1..100; a caller that doesn't is refused, never given negative stock.
  if not qty or qty < 1 or qty ~= math.floor(qty) or qty > 1e9 then
    return {-17, "", "", 0}
  end
  local closed = closed_window(sale, now)
  if closed then
    return closed
  end
  local buyer = buyer_field(channel, user)
  local held = tonumber(rcall("HGET", buyers_key, buyer) or "0")
  if held + qty > tonumber(sale[3]) then
    return {-2, "", "", 0}
  end
  local available = tonumber(sale[5])
  if available < qty and sale[7] and (available > 0 or not sale[8]
                                      or now >= tonumber(sale[8])) then
    return {-15, "", "", available}
  end
  if available <= 0 then
    return {-1, "", "", 0}
  end
  if available < qty then
    return {-6, "", "", 0}
  end

  local status, expires_at = "reserved", now + tonumber(sale[4])
  rcall("HINCRBY", sale_key, "available", -qty)
  rcall("HINCRBY", buyers_key, buyer, qty)
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
end
