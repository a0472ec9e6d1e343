# The "store" tier of the cats app (tests/servers/cats.py) in Ruby: Sinatra on Puma, from
# Debian's packages, so that one hop of the multi-host test crosses a different runtime.
#
#   GET /store/cats/ID   {"id":"ID","name":"cat-ID"}; ID 0 answers 500
#
# With --redis HOST:PORT each request first looks the cat up in Redis (GET cat:ID, over a
# connection per Puma thread); the cache is empty, so the answer stays the same.
#
# Usage: cats_store.rb --port P [--port-file F] [--redis HOST:PORT]
require "json"
require "optparse"
require "socket"
require "sinatra/base"

opts = { port: 8080 }
OptionParser.new do |o|
  o.on("--port P", Integer) { |v| opts[:port] = v }
  o.on("--port-file F") { |v| opts[:port_file] = v }
  o.on("--redis HOST_PORT") { |v| opts[:redis] = v }
end.parse!

if opts[:redis]
  require "redis"
  REDIS_HOST, REDIS_PORT = opts[:redis].split(":")
end

def cached_name(id)
  return nil unless defined?(REDIS_HOST)
  redis = (Thread.current[:redis] ||= Redis.new(host: REDIS_HOST, port: REDIS_PORT.to_i))
  redis.get("cat:#{id}")
end

class Store < Sinatra::Base
  set :server, :puma
  set :bind, "0.0.0.0"
  set :logging, false
  # More threads than the callers have kept-alive connections: Puma holds a thread per
  # connection while it serves it, and the api tier keeps one connection per thread.
  # queue_requests: false makes the worker thread read each request itself. By default
  # Puma's reactor thread may read a request and hand it to a worker, and a call the worker
  # then makes cannot be tied to that request by thread: tracer leaves such calls as roots
  # (see README, "Traces across processes and hosts").
  set :server_settings, { Silent: true, Threads: "4:32", queue_requests: false }

  get "/store/cats/:id" do
    content_type :json
    name = cached_name(params[:id])
    halt 500, '{"error":"no such cat"}' if params[:id] == "0"
    { id: params[:id], name: name || "cat-#{params[:id]}" }.to_json
  end
end

if opts[:port_file]
  # Announce the port once Puma accepts connections.
  Thread.new do
    loop do
      begin
        TCPSocket.new("127.0.0.1", opts[:port]).close
        break
      rescue SystemCallError
        sleep 0.02
      end
    end
    File.write(opts[:port_file] + ".tmp", opts[:port].to_s)
    File.rename(opts[:port_file] + ".tmp", opts[:port_file])
  end
end

Store.set :port, opts[:port]
Store.run!
