--[[
  Create a sale's ledger, or update its window and limits (stock counters are never reset).

  KEYS[1] sale hash
  ARGV[1] starts_at (ms)   ARGV[2] ends_at (ms)
  ARGV[3] per-user limit   ARGV[4] reservation ttl (ms)
  Returns 0
]]
local rcall = redis.call
local sale_key = KEYS[1]
rcall("HSET", sale_key, "start", ARGV[1], "end", ARGV[2], "limit", ARGV[3], "ttl", ARGV[4])
for _, field in ipairs({"total", "available", "reserved", "confirmed", "delivered",
                        "cancelled", "expired"}) do
  rcall("HSETNX", sale_key, field, 0)
end
rcall("HSETNX", sale_key, "state", "open")
return 0
