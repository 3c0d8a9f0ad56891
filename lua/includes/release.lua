-- Shared by cancel.lua, expire.lua, refund.lua (a reserved order refunded) and confirm.lua (a
-- reservation found past its deadline).
-- Moves a *reserved* order to a final status and gives its units back, exactly once:
-- callers check `status == "reserved"` first, and this flips the status in the same script.
-- Units coming back bump the bucket's `restocks` counter and clear its `drained_until` mark.
local function release_reservation(sale_key, order_key, deadlines_key, events_key, buyers_key,
                                   order_id, new_status, now)
  local qty = tonumber(rcall("HGET", order_key, "qty"))
  local user, channel = rcall("HGET", order_key, "user"), rcall("HGET", order_key, "ch")
  local buyer = channel .. ":" .. user  -- buyer_field of includes/reserve_order.lua
  rcall("HSET", order_key, "status", new_status, "ended", now)
  rcall("HINCRBY", sale_key, "available", qty)
  rcall("HINCRBY", sale_key, "reserved", -qty)
  rcall("HINCRBY", sale_key, new_status, qty)
  rcall("HINCRBY", sale_key, "restocks", 1)
  rcall("HDEL", sale_key, "drained_until")
  if tonumber(rcall("HINCRBY", buyers_key, buyer, -qty)) <= 0 then
    rcall("HDEL", buyers_key, buyer)
  end
  rcall("ZREM", deadlines_key, order_id)
  rcall("XADD", events_key, "*", "t", new_status, "o", order_id,
        "ch", channel, "u", user, "q", qty, "at", now)
end
