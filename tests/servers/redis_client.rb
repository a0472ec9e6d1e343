# Redis client for the database tests (the redis gem): single commands, a pipeline of ten
# commands in one write, a MULTI/EXEC transaction, and an error reply.
# Usage: redis_client.rb PORT
require "redis"

r = Redis.new(host: "127.0.0.1", port: ARGV[0].to_i)
r.set("cat:1", "Tom")
puts r.get("cat:1")
r.pipelined do |p|
  10.times { |i| p.incr("visits:#{i % 2}") }
end
r.multi do |m|
  m.set("cat:2", "Felix")
  m.incr("cats")
end
begin
  r.incr("cat:1")
rescue Redis::CommandError => e
  puts "error: #{e.message}"
end
r.close
