--[[
  Rebuild one ledger shard (a sale, or one stock bucket of it) from PostgreSQL's record, after
  Redis lost it (`flashgate reconcile SALE`, core/reconcile.py). All or nothing, and only if
  the shard's sale hash is absent: a ledger that exists is never overwritten, so a second
  reconcile, or one racing another, can't add stock twice.

  KEYS[1] sale hash   KEYS[2] buyers hash   KEYS[3] deadlines zset   KEYS[4] events stream
  KEYS[5] set of applied import ids        KEYS[6..n] order hashes, in the order of ARGV[1].orders
  ARGV[1] JSON (every value a string): {
            "sale": [field, value, ...]   the sale hash (window, limits, counters, state),
            "imports": [import id, ...],  "buyers": [<channel>:<user>, units, ...],
            "orders": [[id, channel, user, qty, status, created, exp, pay, confirmed_at], ...] }
          status "reserved" gets its deadline back (the sweeper expires it if it passed);
          "confirmed" is announced again on the stream, so that the workers deliver it.
  ARGV[2] now (ms)
  Returns {code, orders}: code 0 = rebuilt (orders restored), 1 = the sale hash exists:
          nothing done   (mirrored by core.scripts.ReturnCode: OK, REPLAYED)
]]
local rcall = redis.call
local sale_key, buyers_key, deadlines_key, events_key, imports_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if rcall("EXISTS", sale_key) == 1 then
  return {1, 0}
end
local doc = cjson.decode(ARGV[1])
rcall("DEL", buyers_key, deadlines_key, imports_key)  -- leftovers of a partial loss
for i, o in ipairs(doc.orders) do
  local id, channel, user, qty, status, exp, pay = o[1], o[2], o[3], o[4], o[5], o[7], o[8]
  rcall("HSET", KEYS[5 + i], "ch", channel, "user", user, "qty", qty, "status", status,
        "created", o[6], "exp", exp, "pay", pay, "fp", "", "restored", ARGV[2])
  if status == "reserved" then
    rcall("ZADD", deadlines_key, exp, id)
  elseif status == "confirmed" then
    rcall("XADD", events_key, "*", "t", "confirmed", "o", id, "ch", channel, "u", user,
          "q", qty, "at", o[9], "exp", exp, "pay", pay)
  end
end
for i = 1, #doc.buyers, 2 do
  rcall("HSET", buyers_key, doc.buyers[i], doc.buyers[i + 1])
end
for _, import_id in ipairs(doc.imports) do
  rcall("SADD", imports_key, import_id)
end
rcall("HSET", sale_key, unpack(doc.sale))
return {0, #doc.orders}
