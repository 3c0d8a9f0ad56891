--[[
  Create a sale's ledger (or one stock bucket's), or update its window and limits (stock
  counters and the bucket count are never reset).

  KEYS[1] sale hash (of the bucket)
  ARGV[1] starts_at (ms)   ARGV[2] ends_at (ms)
  ARGV[3] per-user limit   ARGV[4] reservation ttl (ms)
  ARGV[5] stock buckets of the sale (absent = 1)   ARGV[6] this bucket (absent = 0)
  Returns {code, buckets}: code 0 = created or updated, -16 = the sale exists with another
          bucket count (second value: that count; nothing changed)
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key = KEYS[1]
local buckets = tonumber(ARGV[5]) or 1
local existing = tonumber(rcall("HGET", sale_key, "buckets") or "1")
if rcall("EXISTS", sale_key) == 1 and existing ~= buckets then
  return {-16, existing}
end
rcall("HSET", sale_key, "start", ARGV[1], "end", ARGV[2], "limit", ARGV[3], "ttl", ARGV[4])
for _, field in ipairs({"total", "available", "reserved", "confirmed", "delivered",
                        "cancelled", "expired"}) do
  rcall("HSETNX", sale_key, field, 0)
end
rcall("HSETNX", sale_key, "state", "open")
if buckets > 1 then
  rcall("HSETNX", sale_key, "buckets", buckets)
  rcall("HSETNX", sale_key, "bucket", tonumber(ARGV[6]) or 0)
  rcall("HSETNX", sale_key, "transit", 0)
end
return {0, buckets}
