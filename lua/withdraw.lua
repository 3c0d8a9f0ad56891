--[[
  Step 1 of a transfer between two stock buckets of one sale: take up to N available units
  out of the donor bucket and record them as in transit under the transfer id. Idempotent: an
  id withdraws at most once, ever (a retried call answers what the first one did).
  The units leave the donor's `available` and `total` and enter its `transit`, so the donor's
  ledger still balances (available + reserved + confirmed + delivered = total) and no unit can
  be sold twice: until deposit.lua adds them to the recipient, nobody can reserve them. A crash
  after this step strands them in transit until the recovery pass (core/buckets.py) finishes
  the transfer from the record kept here.

  KEYS[1] donor's sale hash   KEYS[2] donor's pending transfers hash
  KEYS[3] donor's set of transfer ids ever withdrawn
  ARGV[1] transfer id   ARGV[2] recipient bucket   ARGV[3] units wanted (> 0)   ARGV[4] now (ms)
  Returns {code, units}: 0 = withdrawn (units > 0), 1 = this id was already used (units: what
          it took, 0 if settled since), -1 = nothing available (no record), -4 = no such sale
  (mirrored by core.scripts.ReturnCode)
]]
local rcall = redis.call
local sale_key, pending_key, ids_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[1]
if rcall("HEXISTS", sale_key, "start") == 0 then
  return {-4, 0}
end
if rcall("SISMEMBER", ids_key, id) == 1 then
  local record = rcall("HGET", pending_key, id)
  local units = record and tonumber(string.match(record, "^[^|]*|([^|]*)|")) or 0
  return {1, units}
end
local available = tonumber(rcall("HGET", sale_key, "available") or "0")
local units = math.min(available, tonumber(ARGV[3]))
if units <= 0 then
  return {-1, 0}
end
rcall("SADD", ids_key, id)
rcall("HSET", pending_key, id, ARGV[2] .. "|" .. units .. "|" .. ARGV[4])
rcall("HINCRBY", sale_key, "available", -units)
rcall("HINCRBY", sale_key, "total", -units)
rcall("HINCRBY", sale_key, "transit", units)
return {0, units}
