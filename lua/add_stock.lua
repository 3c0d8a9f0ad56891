--[[
  Add one committed key import to the sale's stock, at most once per import id.

  KEYS[1] sale hash   KEYS[2] set of applied import ids
  ARGV[1] import id   ARGV[2] number of keys imported
  Returns {code, total}: code 0 = added, 1 = this import was already added,
          -4 = no such sale (see core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, imports_key = KEYS[1], KEYS[2]
if rcall("HEXISTS", sale_key, "start") == 0 then
  return {-4, 0}
end
if rcall("SADD", imports_key, ARGV[1]) == 0 then
  return {1, tonumber(rcall("HGET", sale_key, "total"))}
end
local n = tonumber(ARGV[2])
rcall("HINCRBY", sale_key, "available", n)
return {0, tonumber(rcall("HINCRBY", sale_key, "total", n))}
