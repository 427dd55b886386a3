//! Models of the simulated devices: state machines that advance by a time
//! step and return the values of one message.
//!
//! The models do no I/O and read no clock. The caller passes the elapsed
//! time and the local hour, so the tests run weeks of simulated time in a
//! fraction of a second. Each model owns a random generator seeded by the
//! caller, so a device behaves the same on every start for the same
//! sequence of steps.

use std::f64::consts::TAU;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Local hour (0..24) at which the daily temperature cycle peaks.
pub const PEAK_HOUR: f64 = 15.0;

/// Kilometres per degree of latitude.
const KM_PER_DEGREE: f64 = 111.32;

/// Draws a standard normal sample with the Box–Muller transform, so the
/// crate needs no distribution library.
fn standard_normal(rng: &mut StdRng) -> f64 {
    // `1 - u` lies in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// Probability that an event with a mean waiting time of `mean_s` seconds
/// happens within `dt_s` seconds (a Poisson process).
fn chance(dt_s: f64, mean_s: f64) -> f64 {
    1.0 - (-dt_s / mean_s).exp()
}

fn round_to(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

/// Relative daily temperature swing at `local_hour`: 1 at [`PEAK_HOUR`],
/// -1 twelve hours later.
pub fn daily_cycle(local_hour: f64) -> f64 {
    (TAU * (local_hour - PEAK_HOUR) / 24.0).cos()
}

/// An Ornstein–Uhlenbeck process: a random walk pulled back to 0, for slow
/// weather-like drift that never runs away.
#[derive(Debug, Clone)]
struct MeanReverting {
    value: f64,
    /// Time in seconds after which a deviation has decayed to 1/e.
    time_constant_s: f64,
    /// Standard deviation of the value in the long run.
    long_run_sd: f64,
}

impl MeanReverting {
    /// Advances by `dt_s` with the exact transition, so any step size is stable.
    fn step(&mut self, dt_s: f64, rng: &mut StdRng) -> f64 {
        let decay = (-dt_s / self.time_constant_s).exp();
        let step_sd = self.long_run_sd * (1.0 - decay * decay).sqrt();
        self.value = self.value * decay + step_sd * standard_normal(rng);
        self.value
    }
}

/// Cell voltage of an empty battery in volts (lithium-ion).
const BATTERY_EMPTY_V: f64 = 3.3;
/// Cell voltage of a full battery in volts.
const BATTERY_FULL_V: f64 = 4.2;
/// Extra voltage while the charger is connected.
const CHARGING_EXTRA_V: f64 = 0.05;
/// Mean time between recharges that start before the battery is low (someone
/// swaps or tops it up): three days.
const EARLY_RECHARGE_MEAN_S: f64 = 3.0 * 86_400.0;

#[derive(Debug, Clone)]
struct Battery {
    percent: f64,
    drain_percent_per_hour: f64,
    charge_percent_per_hour: f64,
    /// Charge level in percent at which the battery is always recharged.
    recharge_below_percent: f64,
    charging: bool,
}

impl Battery {
    fn step(&mut self, dt_s: f64, rng: &mut StdRng) {
        let hours = dt_s / 3600.0;
        if self.charging {
            self.percent += self.charge_percent_per_hour * hours;
            if self.percent >= 100.0 {
                self.charging = false;
            }
        } else {
            self.percent -= self.drain_percent_per_hour * hours;
            let early = rng.random_bool(chance(dt_s, EARLY_RECHARGE_MEAN_S));
            if self.percent <= self.recharge_below_percent || early {
                self.charging = true;
            }
        }
        self.percent = self.percent.clamp(0.0, 100.0);
    }

    fn voltage(&self, rng: &mut StdRng) -> f64 {
        let span = BATTERY_FULL_V - BATTERY_EMPTY_V;
        let charging = if self.charging { CHARGING_EXTRA_V } else { 0.0 };
        let noise = 0.005 * standard_normal(rng);
        BATTERY_EMPTY_V + span * self.percent / 100.0 + charging + noise
    }
}

/// Fall of relative humidity in percentage points per degree Celsius above
/// the daily mean. At constant absolute humidity near 20 °C, relative
/// humidity falls by about 6 % of its value per degree, because the
/// saturation vapour pressure rises that fast: about 3 points at 50 %.
const HUMIDITY_PER_DEGREE: f64 = 3.0;
/// Mean time between short signal fades (a vehicle or a door in the path).
const RSSI_FADE_MEAN_S: f64 = 15.0 * 60.0;

/// The values of one message of an environment sensor.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentReading {
    /// Degrees Celsius.
    pub temperature: f64,
    /// Relative humidity in percent, 0 to 100.
    pub humidity: f64,
    /// Volts.
    pub battery_voltage: f64,
    /// Charge level in percent, 0 to 100.
    pub battery_percent: f64,
    /// Received signal strength in dBm.
    pub rssi: i32,
}

impl EnvironmentReading {
    /// Returns the `values` object of the telemetry message. Ferrite flattens
    /// the nested `battery` object to `battery.voltage` and `battery.percent`.
    pub fn to_json(&self) -> Value {
        json!({
            "temperature": round_to(self.temperature, 2),
            "humidity": round_to(self.humidity, 1),
            "battery": {
                "voltage": round_to(self.battery_voltage, 3),
                "percent": round_to(self.battery_percent, 1),
            },
            "rssi": self.rssi,
        })
    }
}

/// A battery-powered temperature and humidity sensor.
#[derive(Debug, Clone)]
pub struct EnvironmentSensor {
    rng: StdRng,
    /// Daily mean temperature in °C.
    mean_temperature: f64,
    /// Half the daily temperature swing in °C.
    amplitude: f64,
    /// Deviation from the daily cycle in °C that changes over hours.
    drift: MeanReverting,
    /// Relative humidity in percent at the daily mean temperature.
    mean_humidity: f64,
    battery: Battery,
    /// Typical received signal strength in dBm.
    mean_rssi: f64,
}

impl EnvironmentSensor {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let battery = Battery {
            percent: rng.random_range(30.0..100.0),
            drain_percent_per_hour: rng.random_range(1.5..4.0),
            charge_percent_per_hour: rng.random_range(30.0..60.0),
            recharge_below_percent: rng.random_range(10.0..20.0),
            charging: false,
        };
        Self {
            mean_temperature: rng.random_range(12.0..24.0),
            amplitude: rng.random_range(2.0..7.0),
            drift: MeanReverting {
                value: 0.0,
                time_constant_s: 6.0 * 3600.0,
                long_run_sd: 1.0,
            },
            mean_humidity: rng.random_range(40.0..65.0),
            battery,
            mean_rssi: rng.random_range(-95.0..-60.0),
            rng,
        }
    }

    /// Advances the sensor by `dt_s` seconds and reads it at `local_hour`
    /// (0..24, fractional).
    pub fn step(&mut self, dt_s: f64, local_hour: f64) -> EnvironmentReading {
        let drift = self.drift.step(dt_s, &mut self.rng);
        let daily = self.amplitude * daily_cycle(local_hour);
        let noise = 0.1 * standard_normal(&mut self.rng);
        let temperature = self.mean_temperature + daily + drift + noise;

        // Humidity follows the temperature in the opposite direction.
        let above_mean = temperature - self.mean_temperature;
        let humidity = self.mean_humidity - HUMIDITY_PER_DEGREE * above_mean
            + 1.5 * standard_normal(&mut self.rng);

        self.battery.step(dt_s, &mut self.rng);

        let mut rssi = self.mean_rssi + 2.0 * standard_normal(&mut self.rng);
        if self.rng.random_bool(chance(dt_s, RSSI_FADE_MEAN_S)) {
            rssi -= self.rng.random_range(8.0..20.0);
        }

        EnvironmentReading {
            temperature,
            humidity: humidity.clamp(0.0, 100.0),
            battery_voltage: self.battery.voltage(&mut self.rng),
            battery_percent: self.battery.percent,
            rssi: rssi.clamp(-120.0, -30.0).round() as i32,
        }
    }
}

/// Maximum step the truck model integrates at once. Longer steps are split.
const TRUCK_SUBSTEP_S: f64 = 5.0;
const MAX_SPEED_KMH: f64 = 100.0;
const ACCELERATION_KMH_PER_S: f64 = 1.2;
const BRAKING_KMH_PER_S: f64 = 3.0;
/// Mean times before a driving truck stops at a light or junction, parks,
/// and changes its target speed.
const DRIVING_TO_IDLING_MEAN_S: f64 = 15.0 * 60.0;
const DRIVING_TO_PARKED_MEAN_S: f64 = 3.0 * 3600.0;
const TARGET_CHANGE_MEAN_S: f64 = 4.0 * 60.0;
/// Mean times before an idling or parked truck drives on.
const IDLING_TO_DRIVING_MEAN_S: f64 = 90.0;
const PARKED_TO_DRIVING_MEAN_S: f64 = 20.0 * 60.0;
/// Standard deviation of the heading change over one 5-second substep.
const HEADING_SD_PER_SUBSTEP: f64 = 3.0;
/// Largest heading change per substep when a truck turns back to its depot.
const RETURN_TURN_PER_SUBSTEP: f64 = 10.0;
/// Distance from the depot in km beyond which a truck heads back.
pub const ROAM_RADIUS_KM: f64 = 120.0;
/// Fuel an idling engine burns, in litres per hour.
const IDLE_LITRES_PER_HOUR: f64 = 2.5;

/// Depots the trucks start from and stay around: (latitude, longitude).
const DEPOTS: [(f64, f64); 8] = [
    (53.551, 9.994),  // Hamburg
    (52.520, 13.405), // Berlin
    (48.137, 11.576), // Munich
    (50.938, 6.960),  // Cologne
    (50.110, 8.682),  // Frankfurt
    (51.924, 4.478),  // Rotterdam
    (45.764, 4.836),  // Lyon
    (45.464, 9.190),  // Milan
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activity {
    Driving,
    /// Stopped with the engine running: traffic, a light, loading.
    Idling,
    /// Stopped, and the engine turns off as soon as the speed reaches 0.
    Parked,
}

/// The values of one message of a truck.
#[derive(Debug, Clone, PartialEq)]
pub struct TruckReading {
    /// Degrees, -90 to 90.
    pub lat: f64,
    /// Degrees, -180 to 180.
    pub lon: f64,
    pub speed_kmh: f64,
    /// Degrees clockwise from north, 0 to 360.
    pub heading: f64,
    /// Tank level in percent, 0 to 100.
    pub fuel_percent: f64,
    pub engine_on: bool,
    pub odometer_km: f64,
}

impl TruckReading {
    /// Returns the `values` object of the telemetry message. Ferrite flattens
    /// the nested objects to `gps.lat`, `gps.lon`, `fuel.level` and `engine.on`.
    pub fn to_json(&self) -> Value {
        json!({
            "gps": {
                "lat": round_to(self.lat, 6),
                "lon": round_to(self.lon, 6),
            },
            "speed": round_to(self.speed_kmh, 1),
            "heading": round_to(self.heading, 0).rem_euclid(360.0),
            "fuel": {"level": round_to(self.fuel_percent, 1)},
            "engine": {"on": self.engine_on},
            "odometer": round_to(self.odometer_km, 1),
        })
    }
}

/// A delivery truck that drives around its depot, stops, parks and refuels.
#[derive(Debug, Clone)]
pub struct Truck {
    rng: StdRng,
    depot: (f64, f64),
    lat: f64,
    lon: f64,
    heading: f64,
    speed_kmh: f64,
    target_kmh: f64,
    activity: Activity,
    tank_litres: f64,
    fuel_litres: f64,
    litres_per_km: f64,
    /// Tank level in percent at which the truck pulls over to refuel.
    refuel_below_percent: f64,
    /// Set from the moment the tank runs low until it has been filled.
    refuel_pending: bool,
    odometer_km: f64,
}

impl Truck {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let depot = DEPOTS[rng.random_range(0..DEPOTS.len())];

        // Start somewhere within a fifth of the roaming radius of the depot.
        let offset_km = rng.random_range(0.0..ROAM_RADIUS_KM / 5.0);
        let offset_bearing = rng.random_range(0.0..360.0_f64).to_radians();
        let lat = depot.0 + offset_km * offset_bearing.cos() / KM_PER_DEGREE;
        let lon = depot.1
            + offset_km * offset_bearing.sin() / (KM_PER_DEGREE * depot.0.to_radians().cos());

        let tank_litres = rng.random_range(400.0..600.0);
        Self {
            depot,
            lat,
            lon,
            heading: rng.random_range(0.0..360.0),
            speed_kmh: 0.0,
            target_kmh: pick_target_speed(&mut rng),
            // Every truck sets off at once, so a new demo shows movement.
            activity: Activity::Driving,
            tank_litres,
            fuel_litres: tank_litres * rng.random_range(0.25..1.0),
            litres_per_km: rng.random_range(0.28..0.38),
            refuel_below_percent: rng.random_range(10.0..20.0),
            refuel_pending: false,
            odometer_km: rng.random_range(50_000.0..400_000.0),
            rng,
        }
    }

    /// Advances the truck by `dt_s` seconds and reads it.
    pub fn step(&mut self, dt_s: f64) -> TruckReading {
        let mut remaining = dt_s.max(0.0);
        while remaining > 0.0 {
            let substep = remaining.min(TRUCK_SUBSTEP_S);
            self.substep(substep);
            remaining -= substep;
        }
        self.reading()
    }

    fn substep(&mut self, dt_s: f64) {
        self.change_activity(dt_s);
        self.steer(dt_s);
        let distance_km = self.change_speed(dt_s);
        self.move_by(distance_km);
        self.use_fuel(dt_s, distance_km);
    }

    fn fuel_percent(&self) -> f64 {
        100.0 * self.fuel_litres / self.tank_litres
    }

    fn engine_on(&self) -> bool {
        !(self.activity == Activity::Parked && self.speed_kmh == 0.0)
    }

    fn change_activity(&mut self, dt_s: f64) {
        if self.fuel_percent() <= self.refuel_below_percent {
            self.refuel_pending = true;
        }

        // A truck that needs fuel pulls over and fills up once it has stopped.
        if self.refuel_pending {
            self.activity = Activity::Parked;
            if self.speed_kmh == 0.0 {
                self.fuel_litres = self.tank_litres;
                self.refuel_pending = false;
            }
            return;
        }

        let rng = &mut self.rng;
        self.activity = match self.activity {
            Activity::Driving if rng.random_bool(chance(dt_s, DRIVING_TO_PARKED_MEAN_S)) => {
                Activity::Parked
            }
            Activity::Driving if rng.random_bool(chance(dt_s, DRIVING_TO_IDLING_MEAN_S)) => {
                Activity::Idling
            }
            Activity::Idling if rng.random_bool(chance(dt_s, IDLING_TO_DRIVING_MEAN_S)) => {
                Activity::Driving
            }
            Activity::Parked if rng.random_bool(chance(dt_s, PARKED_TO_DRIVING_MEAN_S)) => {
                Activity::Driving
            }
            unchanged => unchanged,
        };
        if self.activity == Activity::Driving
            && self.rng.random_bool(chance(dt_s, TARGET_CHANGE_MEAN_S))
        {
            self.target_kmh = pick_target_speed(&mut self.rng);
        }
    }

    /// Wanders the heading while moving, and turns back towards the depot
    /// once the truck is beyond [`ROAM_RADIUS_KM`].
    fn steer(&mut self, dt_s: f64) {
        if self.speed_kmh == 0.0 {
            return;
        }
        let scale = (dt_s / TRUCK_SUBSTEP_S).sqrt();
        self.heading += HEADING_SD_PER_SUBSTEP * scale * standard_normal(&mut self.rng);

        let (distance_km, bearing) = distance_and_bearing((self.lat, self.lon), self.depot);
        if distance_km > ROAM_RADIUS_KM {
            // Signed difference in (-180, 180] between where the depot is
            // and where the truck heads.
            let difference = (bearing - self.heading + 540.0).rem_euclid(360.0) - 180.0;
            let limit = RETURN_TURN_PER_SUBSTEP * dt_s / TRUCK_SUBSTEP_S;
            self.heading += difference.clamp(-limit, limit);
        }
        self.heading = self.heading.rem_euclid(360.0);
    }

    /// Accelerates or brakes towards the speed of the current activity and
    /// returns the distance covered in km.
    fn change_speed(&mut self, dt_s: f64) -> f64 {
        let before = self.speed_kmh;
        let goal = match self.activity {
            Activity::Driving => self.target_kmh,
            Activity::Idling | Activity::Parked => 0.0,
        };
        let after = if goal > before {
            (before + ACCELERATION_KMH_PER_S * dt_s).min(goal)
        } else {
            (before - BRAKING_KMH_PER_S * dt_s).max(goal)
        };

        // Small speed variations while cruising, but a stopped truck stays at 0.
        let wobble = if self.activity == Activity::Driving && after > 0.0 {
            0.5 * standard_normal(&mut self.rng)
        } else {
            0.0
        };
        self.speed_kmh = (after + wobble).clamp(0.0, MAX_SPEED_KMH);
        (before + self.speed_kmh) / 2.0 * dt_s / 3600.0
    }

    fn move_by(&mut self, distance_km: f64) {
        let heading = self.heading.to_radians();
        let km_per_degree_lon = KM_PER_DEGREE * self.lat.to_radians().cos().max(0.01);
        self.lat = (self.lat + distance_km * heading.cos() / KM_PER_DEGREE).clamp(-89.0, 89.0);
        self.lon = (self.lon + distance_km * heading.sin() / km_per_degree_lon + 180.0)
            .rem_euclid(360.0)
            - 180.0;
        self.odometer_km += distance_km;
    }

    fn use_fuel(&mut self, dt_s: f64, distance_km: f64) {
        let idle = if self.engine_on() {
            IDLE_LITRES_PER_HOUR * dt_s / 3600.0
        } else {
            0.0
        };
        let used = self.litres_per_km * distance_km + idle;
        self.fuel_litres = (self.fuel_litres - used).clamp(0.0, self.tank_litres);
    }

    fn reading(&self) -> TruckReading {
        TruckReading {
            lat: self.lat,
            lon: self.lon,
            speed_kmh: self.speed_kmh,
            heading: self.heading,
            fuel_percent: self.fuel_percent(),
            engine_on: self.engine_on(),
            odometer_km: self.odometer_km,
        }
    }
}

/// Picks a cruising speed in km/h: half the time on highways, half in town.
fn pick_target_speed(rng: &mut StdRng) -> f64 {
    if rng.random_bool(0.5) {
        rng.random_range(70.0..90.0)
    } else {
        rng.random_range(25.0..60.0)
    }
}

/// Distance in km and bearing in degrees from `from` to `to`, with the
/// equirectangular approximation, which is close enough within a few
/// hundred km.
fn distance_and_bearing(from: (f64, f64), to: (f64, f64)) -> (f64, f64) {
    let mean_lat = ((from.0 + to.0) / 2.0).to_radians();
    let north_km = (to.0 - from.0) * KM_PER_DEGREE;
    let east_km = (to.1 - from.1) * KM_PER_DEGREE * mean_lat.cos();
    let bearing = east_km.atan2(north_km).to_degrees().rem_euclid(360.0);
    (north_km.hypot(east_km), bearing)
}

#[cfg(test)]
mod tests;
