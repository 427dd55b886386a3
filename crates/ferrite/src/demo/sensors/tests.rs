use super::*;

const WEEK_S: f64 = 7.0 * 86_400.0;

/// Local hour after `elapsed_s` seconds of a simulation that starts at midnight.
fn hour_at(elapsed_s: f64) -> f64 {
    (elapsed_s / 3600.0).rem_euclid(24.0)
}

/// Runs a sensor for `duration_s` in steps of `step_s` and returns every reading
/// with the local hour it was taken at.
fn run_sensor(seed: u64, duration_s: f64, step_s: f64) -> Vec<(f64, EnvironmentReading)> {
    let mut sensor = EnvironmentSensor::new(seed);
    let steps = (duration_s / step_s) as usize;
    (1..=steps)
        .map(|i| {
            let hour = hour_at(i as f64 * step_s);
            (hour, sensor.step(step_s, hour))
        })
        .collect()
}

fn run_truck(seed: u64, duration_s: f64, step_s: f64) -> Vec<TruckReading> {
    let mut truck = Truck::new(seed);
    let steps = (duration_s / step_s) as usize;
    (0..steps).map(|_| truck.step(step_s)).collect()
}

fn pearson(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let mean_x = xs.iter().sum::<f64>() / n;
    let mean_y = ys.iter().sum::<f64>() / n;
    let mut covariance = 0.0;
    let mut var_x = 0.0;
    let mut var_y = 0.0;
    for (x, y) in xs.iter().zip(ys) {
        covariance += (x - mean_x) * (y - mean_y);
        var_x += (x - mean_x).powi(2);
        var_y += (y - mean_y).powi(2);
    }
    covariance / (var_x * var_y).sqrt()
}

#[test]
fn daily_cycle_peaks_in_afternoon() {
    let hottest = (0..24 * 60)
        .map(|minute| minute as f64 / 60.0)
        .max_by(|a, b| daily_cycle(*a).total_cmp(&daily_cycle(*b)))
        .unwrap();
    assert!((12.0..18.0).contains(&hottest), "hottest hour {hottest}");
    assert!((daily_cycle(PEAK_HOUR) - 1.0).abs() < 1e-12);
    assert!((daily_cycle(PEAK_HOUR - 12.0) + 1.0).abs() < 1e-12);
}

#[test]
fn sensor_temperature_peaks_in_afternoon() {
    for seed in 0..10 {
        let mut sums = [0.0; 24];
        let mut counts = [0u32; 24];
        for (hour, reading) in run_sensor(seed, WEEK_S, 60.0) {
            sums[hour as usize] += reading.temperature;
            counts[hour as usize] += 1;
        }
        let means: Vec<f64> = sums.iter().zip(counts).map(|(s, c)| s / c as f64).collect();
        let hottest = (0..24)
            .max_by(|a, b| means[*a].total_cmp(&means[*b]))
            .unwrap();
        let coldest = (0..24)
            .min_by(|a, b| means[*a].total_cmp(&means[*b]))
            .unwrap();
        assert!(
            (12..18).contains(&hottest),
            "seed {seed}: hottest hour {hottest}"
        );
        assert!(
            !(9..21).contains(&coldest),
            "seed {seed}: coldest hour {coldest}"
        );
    }
}

#[test]
fn sensor_humidity_stays_in_range() {
    for seed in 0..20 {
        for (_, reading) in run_sensor(seed, WEEK_S, 10.0) {
            assert!(
                (0.0..=100.0).contains(&reading.humidity),
                "seed {seed}: humidity {}",
                reading.humidity
            );
        }
    }
}

#[test]
fn sensor_humidity_falls_as_temperature_rises() {
    for seed in 0..10 {
        let readings = run_sensor(seed, 2.0 * 86_400.0, 60.0);
        let temperatures: Vec<f64> = readings.iter().map(|(_, r)| r.temperature).collect();
        let humidities: Vec<f64> = readings.iter().map(|(_, r)| r.humidity).collect();
        let correlation = pearson(&temperatures, &humidities);
        assert!(correlation < -0.5, "seed {seed}: correlation {correlation}");
    }
}

#[test]
fn sensor_battery_stays_in_range() {
    // Ten-second steps as in the demo, and hour-long steps that would
    // overshoot without clamping.
    for step_s in [10.0, 3600.0] {
        for seed in 0..20 {
            for (_, reading) in run_sensor(seed, 8.0 * WEEK_S, step_s) {
                let percent = reading.battery_percent;
                assert!(percent >= 0.0, "seed {seed}, step {step_s}: {percent} %");
                assert!(percent <= 100.0, "seed {seed}, step {step_s}: {percent} %");
                assert!(
                    reading.battery_voltage > 3.2 && reading.battery_voltage < 4.3,
                    "seed {seed}, step {step_s}: {} V",
                    reading.battery_voltage
                );
            }
        }
    }
}

#[test]
fn sensor_battery_drains_and_recharges() {
    let readings = run_sensor(3, 4.0 * WEEK_S, 60.0);
    let percents: Vec<f64> = readings.iter().map(|(_, r)| r.battery_percent).collect();
    let falls = percents.windows(2).filter(|w| w[1] < w[0]).count();
    let rises = percents.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        falls > percents.len() / 2,
        "falls {falls} of {}",
        percents.len()
    );
    assert!(rises > 0, "the battery never recharged");
}

#[test]
fn sensor_rssi_stays_in_range() {
    for (_, reading) in run_sensor(5, WEEK_S, 10.0) {
        assert!(
            (-120..=-30).contains(&reading.rssi),
            "rssi {}",
            reading.rssi
        );
    }
}

#[test]
fn sensor_same_seed_same_readings() {
    let first = run_sensor(42, 3600.0, 10.0);
    let second = run_sensor(42, 3600.0, 10.0);
    let other = run_sensor(43, 3600.0, 10.0);
    assert_eq!(first, second);
    assert_ne!(first, other);
}

#[test]
fn truck_values_stay_in_range() {
    for seed in 0..10 {
        let readings = run_truck(seed, WEEK_S, 5.0);
        let mut odometer = f64::MIN;
        for reading in &readings {
            assert!(
                (0.0..=100.0).contains(&reading.fuel_percent),
                "seed {seed}: fuel {}",
                reading.fuel_percent
            );
            assert!(
                (-90.0..=90.0).contains(&reading.lat),
                "seed {seed}: lat {}",
                reading.lat
            );
            assert!(
                (-180.0..=180.0).contains(&reading.lon),
                "seed {seed}: lon {}",
                reading.lon
            );
            assert!(
                (0.0..=MAX_SPEED_KMH).contains(&reading.speed_kmh),
                "seed {seed}: speed {}",
                reading.speed_kmh
            );
            assert!(
                (0.0..360.0).contains(&reading.heading),
                "seed {seed}: heading {}",
                reading.heading
            );
            assert!(
                reading.odometer_km >= odometer,
                "seed {seed}: odometer went back"
            );
            odometer = reading.odometer_km;
        }
    }
}

#[test]
fn truck_stays_near_depot() {
    for seed in 0..10 {
        let mut truck = Truck::new(seed);
        let depot = truck.depot;
        for _ in 0..(WEEK_S / 5.0) as usize {
            let reading = truck.step(5.0);
            let (distance_km, _) = distance_and_bearing((reading.lat, reading.lon), depot);
            assert!(
                distance_km < ROAM_RADIUS_KM + 30.0,
                "seed {seed}: {distance_km} km from the depot"
            );
        }
    }
}

#[test]
fn truck_drives_and_refuels() {
    for seed in 0..10 {
        let readings = run_truck(seed, WEEK_S, 5.0);
        let first = &readings[0];
        let last = &readings[readings.len() - 1];
        let driven_km = last.odometer_km - first.odometer_km;
        assert!(
            driven_km > 500.0,
            "seed {seed}: drove only {driven_km} km in a week"
        );

        let refuels = readings
            .windows(2)
            .filter(|w| w[1].fuel_percent > w[0].fuel_percent + 1.0)
            .count();
        assert!(refuels > 0, "seed {seed}: never refuelled");

        let lowest = readings
            .iter()
            .map(|r| r.fuel_percent)
            .fold(100.0, f64::min);
        assert!(lowest > 5.0, "seed {seed}: fuel fell to {lowest} %");
    }
}

#[test]
fn truck_engine_off_only_when_stopped() {
    let readings = run_truck(7, WEEK_S, 5.0);
    for reading in &readings {
        if !reading.engine_on {
            assert_eq!(reading.speed_kmh, 0.0);
        }
    }
    assert!(
        readings.iter().any(|r| !r.engine_on),
        "the engine never turned off"
    );
    assert!(
        readings.iter().any(|r| r.engine_on && r.speed_kmh == 0.0),
        "the truck never idled"
    );
}

#[test]
fn truck_long_step_is_split() {
    // A 60-second step is split into 5-second substeps, so it covers a
    // plausible distance instead of jumping at a single speed.
    let mut truck = Truck::new(11);
    let before = truck.step(0.0);
    let after = truck.step(60.0);
    let driven_km = after.odometer_km - before.odometer_km;
    assert!(
        (0.0..=MAX_SPEED_KMH / 60.0).contains(&driven_km),
        "{driven_km} km in a minute"
    );
}

#[test]
fn readings_flatten_to_expected_keys() {
    let mut sensor = EnvironmentSensor::new(1);
    let values = sensor.step(10.0, 12.0).to_json();
    assert!(values["temperature"].is_f64());
    assert!(values["humidity"].is_f64());
    assert!(values["battery"]["voltage"].is_f64());
    assert!(values["battery"]["percent"].is_f64());
    assert!(values["rssi"].is_i64());

    let mut truck = Truck::new(1);
    let values = truck.step(5.0).to_json();
    assert!(values["gps"]["lat"].is_f64());
    assert!(values["gps"]["lon"].is_f64());
    assert!(values["speed"].is_number());
    assert!(values["fuel"]["level"].is_number());
    assert!(values["engine"]["on"].is_boolean());
    assert!(values["odometer"].is_f64());
}
